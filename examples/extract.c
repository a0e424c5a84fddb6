/* Extracts layers into an ext4 image through layerx's C ABI.
 *
 *   extract-c OUTPUT.img SOURCE...      SOURCE: oci:DIR[:REF], docker-archive:FILE, layer files
 *
 * Prints the library version, a progress count, warnings, and the result:
 * "ok: N entries in L layers" and the JSON summary, or the one-line error with
 * its parts (status, layer, entry, reason). Exit status 0 ok, 1 failed.
 * Build against an installed layerx:
 *   cc extract.c $(pkg-config --cflags --libs layerx) -o extract-c
 */
#include <layerx/layerx.h>
#include <stdio.h>
#include <string.h>

struct counts {
  unsigned progress_calls;
  unsigned layers_done;
};

static void on_log(void *user, int level, const char *component, const char *message) {
  (void)user;
  fprintf(stderr, "log(%d) %s: %s\n", level, component, message);
}

static void on_progress(void *user, const layerx_progress *p) {
  struct counts *c = user;
  c->progress_calls++;
  if (p->done) c->layers_done++;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s OUTPUT.img SOURCE...\n", argv[0]);
    return 2;
  }
  printf("layerx %s\n", layerx_version());
  layerx_request *req = layerx_request_new();
  if (req == NULL) return 1;
  for (int i = 2; i < argc; i++) layerx_request_add_source(req, argv[i]);
  layerx_request_set_output(req, LAYERX_OUTPUT_EXT4, argv[1]);
  layerx_request_set_int(req, LAYERX_OPT_REPRODUCIBLE, 1);
  struct counts counts = {0, 0};
  layerx_request_set_log(req, on_log, 3 /* warnings and errors */, NULL);
  layerx_request_set_progress(req, on_progress, &counts);

  layerx_result *res = NULL;
  layerx_status status = layerx_extract(req, &res);
  int rc = 0;
  if (status == LAYERX_OK) {
    printf("ok: %llu entries in %zu layers (%u progress calls, %u layers done)\n",
           (unsigned long long)layerx_result_entries(res), layerx_result_layer_count(res),
           counts.progress_calls, counts.layers_done);
    printf("%s\n", layerx_result_json(res));
  } else {
    size_t entry_size = 0;
    const char *entry = layerx_result_entry(res, &entry_size);
    fprintf(stderr, "error: %s\n", layerx_result_message(res));
    fprintf(stderr, "  status=%s layer=%zu (%s) entry=%.*s reason=%s errno=%d\n",
            layerx_status_name(status), layerx_result_layer_index(res),
            layerx_result_layer_name(res), (int)entry_size, entry, layerx_result_reason(res),
            layerx_result_errno(res));
    rc = 1;
  }
  layerx_result_free(res);
  layerx_request_free(req);
  return rc;
}
