/* A shared object that announces itself when anything loads it. The poison test
 * ships it in an image as the dynamic loader, libnss_files, a gconv module, an
 * ld.so.preload entry and an OpenSSL engine: if the jailed extractor ever loaded
 * code from the image, a marker appears (inside the rootfs when jailed, on the
 * host otherwise). */
#include <fcntl.h>
#include <unistd.h>

__attribute__((constructor)) static void poison_ran(void) {
  static const char msg[] = "poison ran\n";
  const char* markers[] = {"/POISON-RAN", "/tmp/layerx-poison-ran"};
  for (unsigned i = 0; i < sizeof(markers) / sizeof(markers[0]); ++i) {
    int fd = open(markers[i], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0666);
    if (fd >= 0) {
      (void)!write(fd, msg, sizeof(msg) - 1);
      close(fd);
    }
  }
}

/* What NSS, gconv and OpenSSL would look up once loaded. */
int _nss_files_getpwnam_r(void) { poison_ran(); return 0; }
int gconv(void) { poison_ran(); return 0; }
int gconv_init(void) { poison_ran(); return 0; }
int bind_engine(void) { poison_ran(); return 0; }
unsigned long v_check(unsigned long v) { poison_ran(); return v; }
