// `layerx serve`'s configuration: the shipped example reads, peers map to
// tenants by uid before gid, and every mistake is refused naming its key.
#include "broker/service/service_config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

namespace layerx::broker {
namespace {

// Every tenant's policy loads as the default with max_entries = 77.
Result<policy::Policy> FakePolicy(const std::string&) {
  policy::Policy p = policy::DefaultPolicy();
  p.limits.max_entries = 77;
  return p;
}

std::string Example() {
  std::ifstream in(LAYERX_SOURCE_DIR "/packaging/serve.example.toml");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

TEST(ServiceConfigTest, ShippedExampleReads) {
  auto config = ParseServiceConfig(Example(), "serve.example.toml", FakePolicy);
  ASSERT_TRUE(config) << config.error().ToString();
  EXPECT_EQ(config->max_concurrent_jobs, 0u);
  EXPECT_EQ(config->queue_limit, 256u);
  EXPECT_EQ(config->log_format, "text");
  EXPECT_EQ(config->idle_timeout_seconds, 60u);
  ASSERT_EQ(config->tenants.size(), 2u);
  EXPECT_EQ(config->tenants[0].name, "ci");
  EXPECT_EQ(config->tenants[0].max_concurrent, 4u);
  EXPECT_EQ(config->tenants[0].max_connections, 64u);
  EXPECT_EQ(config->tenants[1].max_connections, 16u);
  EXPECT_EQ(config->tenants[0].byte_budget, 34359738368u);
  EXPECT_EQ(config->tenants[0].policy.limits.max_entries, 77u);
}

TEST(ServiceConfigTest, PeersMapByUidThenGid) {
  auto config = ParseServiceConfig(
      "[[tenant]]\nname = \"a\"\nuids = [1000]\n"
      "[[tenant]]\nname = \"b\"\nuids = [2000]\ngids = [1000, 3000]\n",
      "t.toml");
  ASSERT_TRUE(config) << config.error().ToString();
  EXPECT_EQ(config->TenantFor(1000, 3000)->name, "a");  // the uid wins over b's gid
  EXPECT_EQ(config->TenantFor(2000, 0)->name, "b");
  EXPECT_EQ(config->TenantFor(4242, 3000)->name, "b");
  EXPECT_EQ(config->TenantFor(4242, 4242), nullptr);  // unknown peers are refused
  EXPECT_EQ(config->tenants[0].max_concurrent, 1u);   // defaults
  EXPECT_EQ(config->tenants[0].max_connections, 64u);
  EXPECT_EQ(config->idle_timeout_seconds, 60u);
  EXPECT_EQ(config->tenants[0].policy.limits.max_entries,
            policy::DefaultPolicy().limits.max_entries);
}

struct BadCase {
  const char* name;
  const char* text;
  const char* names;  // what the error must mention
};

class ServiceConfigRejectsTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(ServiceConfigRejectsTest, NamingTheKey) {
  auto config = ParseServiceConfig(GetParam().text, "t.toml", FakePolicy);
  ASSERT_FALSE(config);
  EXPECT_EQ(config.error().kind(), ErrorKind::kPolicy);
  EXPECT_NE(config.error().ToString().find(GetParam().names), std::string::npos)
      << config.error().ToString();
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ServiceConfigRejectsTest,
    ::testing::Values(
        BadCase{"UnknownServiceKey", "[service]\nmax_jobs = 3\n", "service.max_jobs"},
        BadCase{"UnknownSection", "[limits]\nx = 1\n", "limits"},
        BadCase{"UnknownTenantKey", "[[tenant]]\nname = \"a\"\nuids = [1]\nadmin = true\n",
                "tenant[0].admin"},
        BadCase{"NegativeNumber", "[service]\nqueue_limit = -1\n", "service.queue_limit"},
        BadCase{"WrongType", "[service]\nqueue_limit = \"10\"\n", "service.queue_limit"},
        BadCase{"BadLogFormat", "[service]\nlog_format = \"xml\"\n", "service.log_format"},
        BadCase{"ZeroConcurrency", "[[tenant]]\nname = \"a\"\nuids = [1]\nmax_concurrent = 0\n",
                "tenant[0].max_concurrent"},
        BadCase{"ZeroConnections", "[[tenant]]\nname = \"a\"\nuids = [1]\nmax_connections = 0\n",
                "tenant[0].max_connections"},
        BadCase{"ConnectionsOverTheServicesCap",
                "[[tenant]]\nname = \"a\"\nuids = [1]\nmax_connections = 1025\n",
                "tenant[0].max_connections: want a whole number from 1 to 1024"},
        BadCase{"NoIdleTimeout", "[service]\nidle_timeout_seconds = 0\n",
                "service.idle_timeout_seconds"},
        BadCase{"NoName", "[[tenant]]\nuids = [1]\n", "tenant[0]: no name"},
        BadCase{"NoIds", "[[tenant]]\nname = \"a\"\n", "no uids or gids"},
        BadCase{"NoIdUidMinusOne", "[[tenant]]\nname = \"a\"\nuids = [4294967295]\n",
                "tenant[0].uids"},
        BadCase{"UidInTwoTenants",
                "[[tenant]]\nname = \"a\"\nuids = [5]\n[[tenant]]\nname = \"b\"\nuids = [5]\n",
                "uid 5 is given to tenant \"a\" and to tenant \"b\""},
        BadCase{"GidInTwoTenants",
                "[[tenant]]\nname = \"a\"\ngids = [7]\n[[tenant]]\nname = \"b\"\ngids = [7]\n",
                "gid 7"},
        BadCase{"NameTwice",
                "[[tenant]]\nname = \"a\"\nuids = [1]\n[[tenant]]\nname = \"a\"\nuids = [2]\n",
                "name a"},
        BadCase{"TenantQueueOverServiceQueue",
                "[service]\nqueue_limit = 4\n[[tenant]]\nname = \"a\"\nuids = [1]\nmax_queued = 5\n",
                "max_queued=5 is over [service] queue_limit=4"},
        BadCase{"Syntax", "[service\n", "t.toml:1"},
        BadCase{"NotAscii", "# caf\xc3\xa9\n", "not ASCII"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(ServiceConfigTest, RefusesAPolicyThatDoesNotLoadNamingTheTenant) {
  auto config = ParseServiceConfig(
      "[[tenant]]\nname = \"ci\"\nuids = [1]\npolicy = \"/nonexistent/ci.toml\"\n", "t.toml");
  ASSERT_FALSE(config);
  std::string text = config.error().ToString();
  EXPECT_NE(text.find("tenant \"ci\""), std::string::npos) << text;
  EXPECT_NE(text.find("/nonexistent/ci.toml"), std::string::npos) << text;
}

}  // namespace
}  // namespace layerx::broker
