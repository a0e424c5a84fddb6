// Component loggers: `broker`, `sandbox`, `extractor`, `ext4`. main() creates
// them with synchronous sinks (async loggers break across fork, spdlog#748);
// library code looks them up here and falls back to spdlog's default logger.
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string>

namespace layerx::broker {

std::shared_ptr<spdlog::logger> Logger(const std::string& name);

// Creates the component loggers on stderr at `level` (CLI use).
void SetUpLogging(spdlog::level::level_enum level);

}  // namespace layerx::broker
