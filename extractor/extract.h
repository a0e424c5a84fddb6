// One layer, start to end: read entries with the LayerReader, apply them with the
// Applier, count against the per-layer limits. Runs the same in the jail (main.cc)
// and in unit tests on a temp dir.
#pragma once

#include <string>

#include "extractor/applier.h"
#include "extractor/layer_reader.h"

namespace layerx::extractor {

struct LayerTotals {
  uint64_t entries = 0;
  uint64_t file_bytes = 0;
  uint64_t uncompressed_bytes = 0;
  std::string uncompressed_digest;
};

struct ExtractFailure {
  Error error;
  std::string entry;  // the untrusted name being applied, empty if none
};

// Reads every entry from `reader` (already Open()ed) into `applier`.
std::expected<LayerTotals, ExtractFailure> ExtractLayer(LayerReader& reader, Applier& applier,
                                                        const policy::Limits& limits);

}  // namespace layerx::extractor
