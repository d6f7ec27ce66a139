// Window gather fused with the pixel normalisation and the norm-pix targets
// (docs/DESIGN.md §1.2, §1.3): reads only the patches the windows use, straight from the
// image as it was uploaded.
//
// images [B,3,H,W] u8 (8-bit colours, normalised here) or f32 (already normalised),
// window_origin [S,2] u32, pos_slot [S,K²] i32
//   -> patches [S*V, 3p²] T in (c, y, x) order   (rows of the patch-embedding GEMM)
//   -> targets [S*M, 3p²] f32 in (y, x, c) order (norm-pix applied when asked)
// pos_slot[s*K² + i] is the visible row of window position i (>= 0) or -(1 + masked row).
// No backward: the images need no gradient.
#include "common.cuh"

// An 8-bit colour of channel c as the model sees it: the CPU's normalise_pixel
// (src/data/mod.rs), in the same IEEE operations and constants, so both give the same bits.
__device__ __forceinline__ float normalise_pixel(int c, unsigned char byte) {
  const float mean = c == 0 ? 0.485f : (c == 1 ? 0.456f : 0.406f);
  const float stdev = c == 0 ? 0.229f : (c == 1 ? 0.224f : 0.225f);
  return __fdiv_rn(__fsub_rn(__fdiv_rn((float)byte, 255.0f), mean), stdev);
}

__device__ __forceinline__ float pixel_value(const unsigned char* p, int c) {
  return normalise_pixel(c, *p);
}
__device__ __forceinline__ float pixel_value(const float* p, int) { return *p; }

// One block per window position (s, i); blockDim.x a multiple of 32.
template <typename In, typename T>
__device__ void window_gather(const In* images, const unsigned* window_origin,
                              const int* pos_slot, T* patches, float* targets,
                              int windows_per_image, int image, int patch, int window,
                              int norm_pix) {
  const int pos = blockIdx.x;
  const int area = window * window;
  const int s = pos / area;
  const int i = pos % area;
  const int b = s / windows_per_image;
  const int grid_row = (int)window_origin[2 * s] + i / window;
  const int grid_col = (int)window_origin[2 * s + 1] + i % window;
  const int pp = patch * patch;
  const int dim = 3 * pp;
  const size_t plane = (size_t)image * image;
  // Top-left pixel of the patch in channel 0.
  const In* img = images + (size_t)b * 3 * plane + (size_t)grid_row * patch * image +
                  (size_t)grid_col * patch;
  const int slot = pos_slot[pos];  // the same for the whole block

  if (slot >= 0) {
    T* out = patches + (size_t)slot * dim;
    for (int e = threadIdx.x; e < dim; e += blockDim.x) {
      const int c = e / pp;
      const int y = (e / patch) % patch;
      const int x = e % patch;
      out[e] = from_float<T>(pixel_value(img + c * plane + (size_t)y * image + x, c));
    }
    return;
  }

  float* out = targets + (size_t)(-slot - 1) * dim;
  // Pixel e of the target, in (y, x, c) order.
  auto pixel = [&](int e) {
    const int y = e / (3 * patch);
    const int x = (e / 3) % patch;
    const int c = e % 3;
    return pixel_value(img + c * plane + (size_t)y * image + x, c);
  };
  float mean = 0.0f;
  float std = 1.0f;
  if (norm_pix) {
    float sum = 0.0f;
    for (int e = threadIdx.x; e < dim; e += blockDim.x) sum += pixel(e);
    mean = block_sum(sum) / (float)dim;
    float sq = 0.0f;
    for (int e = threadIdx.x; e < dim; e += blockDim.x) {
      const float d = pixel(e) - mean;
      sq += d * d;
    }
    // Unbiased variance, as torch.var in MAE's norm-pix loss.
    const float var = block_sum(sq) / (float)(dim - 1);
    std = sqrtf(var + 1e-6f);
  }
  for (int e = threadIdx.x; e < dim; e += blockDim.x) out[e] = (pixel(e) - mean) / std;
}

// window_gather_{T}: f32 images; window_gather_bytes_{T}: u8 images.
#define EXPORT_WINDOW_GATHER(IN, T, NAME)                                                   \
  extern "C" __global__ void NAME(const IN* images, const unsigned* window_origin,         \
                                  const int* pos_slot, T* patches, float* targets,         \
                                  int windows_per_image, int image, int patch, int window, \
                                  int norm_pix) {                                           \
    window_gather<IN, T>(images, window_origin, pos_slot, patches, targets,                 \
                         windows_per_image, image, patch, window, norm_pix);                \
  }
EXPORT_WINDOW_GATHER(float, float, window_gather_f32)
EXPORT_WINDOW_GATHER(float, bf16, window_gather_bf16)
EXPORT_WINDOW_GATHER(unsigned char, float, window_gather_bytes_f32)
EXPORT_WINDOW_GATHER(unsigned char, bf16, window_gather_bytes_bf16)
