#include "extractor/extract.h"

namespace layerx::extractor {

std::expected<LayerTotals, ExtractFailure> ExtractLayer(LayerReader& reader, Applier& applier,
                                                        const policy::Limits& limits) {
  LayerTotals totals;
  std::string current;
  auto fail = [&](Error error) {
    return std::unexpected(ExtractFailure{std::move(error), current});
  };
  DataFeed feed = [&reader](const DataSink& sink) { return reader.ReadData(sink); };
  while (true) {
    auto next = reader.Next();
    if (!next) {
      // A header refused for what it holds names its entry; one that could not
      // be parsed has no trustworthy name: point at the last good one.
      Error error = std::move(next).error();
      if (!reader.failed_name().empty()) {
        current = reader.failed_name();
        return fail(std::move(error));
      }
      if (!current.empty()) error = std::move(error).With("after entry {:?}", current);
      current.clear();
      return fail(std::move(error));
    }
    if (!next->has_value()) break;
    const TarEntry& entry = **next;
    current = entry.untrusted_name;
    if (++totals.entries > limits.max_entries) {
      return fail(MakeError(ErrorKind::kLimitExceeded, "more than max_entries={} entries",
                            limits.max_entries));
    }
    if (Status status = applier.Apply(entry, feed); !status) return fail(std::move(status).error());
  }
  current.clear();
  if (Status status = applier.Finish(); !status) {
    current = applier.failed_entry();
    return fail(std::move(status).error());
  }
  totals.file_bytes = applier.file_bytes();
  auto digest = reader.UncompressedDigest();
  if (!digest) return fail(std::move(digest).error().With("after the last entry"));
  totals.uncompressed_digest = std::move(*digest);
  totals.uncompressed_bytes = reader.uncompressed_bytes();
  return totals;
}

}  // namespace layerx::extractor
