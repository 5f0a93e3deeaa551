/* driver.c: the matmul kernels (runtime/native/matmul.c, activations.c) without onnxruntime or Python, for
 * running another architecture's build under qemu-user (tests/test_native_cross.py).
 *
 *   driver TILE M K N PATH [DIGITS [BLOCKS]] < tiles, then M·K float32 activations
 *                                                                     > M·N float32 outputs
 *
 * PATH: 0 portable, 3 NEON (tiles.h); DIGITS: the activations' int8 digits, 1 (default) or 2;
 * BLOCKS: two digits on each row's BLOCKS blocks of largest scale (0, the default: all).
 * Exit status 2: the path is not available here. */
#include <stdio.h>
#include <stdlib.h>

#include "tiles.h"

int main(int argc, char** argv) {
  if (argc < 6 || argc > 8)
    return fprintf(stderr, "usage: driver TILE M K N PATH [DIGITS [BLOCKS]]\n"), 1;
  int tile = atoi(argv[1]), path = atoi(argv[5]), digits = argc >= 7 ? atoi(argv[6]) : 1;
  long blocks = argc == 8 ? atol(argv[7]) : 0;
  long m = atol(argv[2]), k = atol(argv[3]), n = atol(argv[4]);
  size_t wbytes = (size_t)(n / ROWS) * (size_t)(k / BLOCK) * (size_t)tile;
  uint8_t* w = malloc(wbytes);
  float* a = malloc(sizeof(float) * (size_t)(m * k));
  float* y = malloc(sizeof(float) * (size_t)(m * n));
  if (!w || !a || !y) return 1;
  if (fread(w, 1, wbytes, stdin) != wbytes) return fprintf(stderr, "short tiles\n"), 1;
  if (fread(a, sizeof(float), (size_t)(m * k), stdin) != (size_t)(m * k))
    return fprintf(stderr, "short activations\n"), 1;
  if (llamaonnx_kernel_path(path) != path) return 2;
  if (llamaonnx_matmul_digits(tile, a, m, k, w, n, y, digits, blocks))
    return fprintf(stderr, "bad shapes or digits\n"), 1;
  fwrite(y, sizeof(float), (size_t)(m * n), stdout);
  return 0;
}
