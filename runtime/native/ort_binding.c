/* ort_binding.c: the library as onnxruntime sees it — its C API reached through the OrtApi
 * function table by index, the four matmul ops and GroupQueryAttention of domain ai.llamaonnx,
 * and RegisterCustomOps. The kernels are in matmul.c (with activations.c) and attention.c;
 * weights.c holds their weights in huge pages. */
#include "tiles.h"

#include <stdio.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
} OrtApiBase;

/* OrtApi entries by index (onnxruntime_c_api.h, struct OrtApi; API version 17 and later). */
enum {
  CREATE_STATUS = 0,
  CREATE_CUSTOM_OP_DOMAIN = 26,
  CUSTOM_OP_DOMAIN_ADD = 27,
  ADD_CUSTOM_OP_DOMAIN = 28,
  GET_TENSOR_MUTABLE_DATA = 51,
  GET_DIMENSIONS_COUNT = 61,
  GET_DIMENSIONS = 62,
  GET_TENSOR_TYPE_AND_SHAPE = 65,
  KERNEL_INFO_GET_ATTRIBUTE_FLOAT = 85,
  KERNEL_INFO_GET_ATTRIBUTE_INT64 = 86,
  KERNEL_CONTEXT_GET_INPUT_COUNT = 88,
  KERNEL_CONTEXT_GET_OUTPUT_COUNT = 89,
  KERNEL_CONTEXT_GET_INPUT = 90,
  KERNEL_CONTEXT_GET_OUTPUT = 91,
  RELEASE_STATUS = 93,
  RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
  KERNEL_INFO_GET_CONSTANT_INPUT_TENSOR = 249,
  GET_BUILD_INFO_STRING = 254,
  KERNEL_CONTEXT_PARALLEL_FOR = 274,
  GET_TENSOR_SHAPE_REFERENCE = 414, /* GetTensorElementTypeAndShapeDataReference, API 24 */
};
#define API_VERSION 17
#define ORT_INVALID_ARGUMENT 2
#define ORT_FAIL 1

static const void* const* api; /* the OrtApi table */
#define CALL(index, type) ((type)api[index])

typedef OrtStatus* (*create_status_fn)(int, const char*);
typedef OrtStatus* (*count_fn)(const OrtKernelContext*, size_t*);
typedef OrtStatus* (*get_input_fn)(const OrtKernelContext*, size_t, const OrtValue**);
typedef OrtStatus* (*get_output_fn)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
typedef OrtStatus* (*type_and_shape_fn)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
typedef OrtStatus* (*shape_reference_fn)(const OrtValue*, int*, const int64_t**, size_t*);
typedef OrtStatus* (*dims_count_fn)(const OrtTensorTypeAndShapeInfo*, size_t*);
typedef OrtStatus* (*dims_fn)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
typedef void (*release_info_fn)(OrtTensorTypeAndShapeInfo*);
typedef OrtStatus* (*mutable_data_fn)(OrtValue*, void**);
typedef OrtStatus* (*parallel_for_fn)(const OrtKernelContext*, void (*)(void*, size_t), size_t,
                                      size_t, void*);
typedef OrtStatus* (*create_domain_fn)(const char*, OrtCustomOpDomain**);
typedef OrtStatus* (*domain_add_fn)(OrtCustomOpDomain*, const void*);
typedef OrtStatus* (*add_domain_fn)(OrtSessionOptions*, OrtCustomOpDomain*);
typedef const char* (*build_info_fn)(void);
typedef OrtStatus* (*attr_int_fn)(const OrtKernelInfo*, const char*, int64_t*);
typedef OrtStatus* (*attr_float_fn)(const OrtKernelInfo*, const char*, float*);
typedef OrtStatus* (*constant_input_fn)(const OrtKernelInfo*, size_t, int*, const OrtValue**);
typedef void (*release_status_fn)(OrtStatus*);

#define TRY(expr)                 \
  do {                            \
    OrtStatus* _s = (expr);       \
    if (_s) return _s;            \
  } while (0)

/* fn over tasks 0..n-1 on the library's threads where the runtime started them (pool.c), else
   on onnxruntime's */
static OrtStatus* parallel(OrtKernelContext* ctx, void (*fn)(void*, size_t), size_t n, void* data) {
  if (pool_run(fn, data, n)) return NULL;
  return CALL(KERNEL_CONTEXT_PARALLEL_FOR, parallel_for_fn)(ctx, fn, n, 0, data);
}

static OrtStatus* error(int code, const char* msg) {
  return CALL(CREATE_STATUS, create_status_fn)(code, msg);
}

/* Whether this onnxruntime lends a tensor's shape by reference (C API 24, onnxruntime 1.24): one
   call an input instead of four and an allocation (GetTensorTypeAndShape's info object), at
   ~150 node calls a decode step worth 1.03–1.07× one row's decode (runtime.bench.ab, 15
   rounds each load order, Intel Xeon family 6 model 167, docs/speed.md); 8 rows level.
   LLAMAONNX_SHAPES_BY_COPY=1 reads them as an older onnxruntime must (tests cover both). */
static int shape_by_reference;

static OrtStatus* shape_of(const OrtValue* v, int64_t* dims, size_t* rank) {
  if (shape_by_reference) {
    int type;
    const int64_t* lent;
    TRY(CALL(GET_TENSOR_SHAPE_REFERENCE, shape_reference_fn)(v, &type, &lent, rank));
    if (*rank > 8) return error(ORT_INVALID_ARGUMENT, "MatMulQ4: rank above 8");
    if (*rank) memcpy(dims, lent, sizeof(int64_t) * *rank);
    return NULL;
  }
  OrtTensorTypeAndShapeInfo* info;
  TRY(CALL(GET_TENSOR_TYPE_AND_SHAPE, type_and_shape_fn)(v, &info));
  OrtStatus* s = CALL(GET_DIMENSIONS_COUNT, dims_count_fn)(info, rank);
  if (!s && *rank > 8) s = error(ORT_INVALID_ARGUMENT, "MatMulQ4: rank above 8");
  if (!s) s = CALL(GET_DIMENSIONS, dims_fn)(info, dims, *rank);
  CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, release_info_fn)(info);
  return s;
}

/* Input i of a kernel call: its value, shape and data. */
typedef struct {
  const OrtValue* value;
  int64_t dims[8];
  size_t rank;
  void* data;
} Input;

/* The shape and data of in->value. */
static OrtStatus* described(Input* in) {
  TRY(shape_of(in->value, in->dims, &in->rank));
  return CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)((OrtValue*)in->value, &in->data);
}

static OrtStatus* input(OrtKernelContext* ctx, size_t i, Input* in) {
  TRY(CALL(KERNEL_CONTEXT_GET_INPUT, get_input_fn)(ctx, i, &in->value));
  return described(in);
}

/* Input i where the node may leave it out (or give it no name): value NULL when absent. */
static OrtStatus* optional_input(OrtKernelContext* ctx, size_t i, Input* in) {
  size_t count;
  in->value = NULL, in->data = NULL, in->rank = 0;
  TRY(CALL(KERNEL_CONTEXT_GET_INPUT_COUNT, count_fn)(ctx, &count));
  if (i >= count) return NULL;
  TRY(CALL(KERNEL_CONTEXT_GET_INPUT, get_input_fn)(ctx, i, &in->value));
  return in->value ? described(in) : NULL;
}

/* Input i at kernel creation where it is a constant initializer (the session holds it, with its
   shape and data, for the kernel's life): read once there instead of on every call, which at
   decode is ~6 API calls and an allocation an input, ~0.3 µs (docs/speed.md, "2026-12-04
   06:40"). value NULL where it is not constant, or absent: the call reads it. */
static void constant_input(const OrtKernelInfo* info, size_t i, Input* in) {
  int constant = 0;
  in->value = NULL;
  OrtStatus* st = CALL(KERNEL_INFO_GET_CONSTANT_INPUT_TENSOR, constant_input_fn)(info, i, &constant,
                                                                              &in->value);
  if (!st && constant && in->value) st = described(in);
  else in->value = NULL;
  if (st) CALL(RELEASE_STATUS, release_status_fn)(st), in->value = NULL;
}

/* Input i, read at kernel creation where it is constant (`known`). */
static OrtStatus* input_or(const Input* known, OrtKernelContext* ctx, size_t i, Input* in) {
  if (known->value) return *in = *known, NULL;
  return input(ctx, i, in);
}

/* A matmul node's kernel: its weight format, and the epsilon of the RMSNorm it may fold in (< 0:
   the node has no epsilon attribute). */
typedef struct {
  int bits, swiglu, digits; /* digits: the node's `digits` attribute, 1 (default) or 2 */
  int64_t blocks;           /* its `blocks` attribute: two digits on each row's B blocks (0: all) */
  float eps;
  Held* _Atomic held; /* its weights in huge pages (weights.c) */
  Input b, gamma;     /* the weights and the norm weight, where constant (constant_input) */
} Kind;

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  Kind* kind = (Kind*)kernel;
  int bits = kind->bits;
  Input a, b, gamma, skip;
  TRY(input(ctx, 0, &a));
  TRY(input_or(&kind->b, ctx, 1, &b));
  if (kind->gamma.value) gamma = kind->gamma;
  else TRY(optional_input(ctx, 2, &gamma));
  TRY(optional_input(ctx, 3, &skip));
  const int64_t *adims = a.dims, *bdims = b.dims;
  size_t arank = a.rank;
  int tile = b.rank == 3 ? (int)bdims[2] : 0;
  if (tile_bits(tile) != bits)
    return error(ORT_INVALID_ARGUMENT,
                 bits == 8 ? "MatMulQ8: B must be uint8 [N/16, K/32, 560, 544 (8-bit) or 512, 424 (6-bit)]"
                           : "MatMulQ4: B must be uint8 [N/16, K/32, 336, 320, 288, 400, 312 or 296 "
                             "(4-bit) or 352, 384, 416, 448, 464 or 376 (5-bit)]");
  if (arank < 1 || adims[arank - 1] != bdims[1] * BLOCK)
    return error(ORT_INVALID_ARGUMENT, "MatMulQ4/Q8: A's last dimension must be K = 32 · B.shape[1]");
  if (super_tile(tile) && bdims[1] % K4_BLOCKS)
    return error(ORT_INVALID_ARGUMENT,
                 "MatMulQ4/Q8: 312-, 296-, 376- and 424-byte (Q4_K, Q5_K, Q6_K) tiles "
                 "need K a multiple of 256");
  if (kind->swiglu && bdims[0] % 2)
    return error(ORT_INVALID_ARGUMENT,
                 "MatMulQ4SwiGLU/MatMulQ8SwiGLU: B needs as many up rows as gate rows");
  int64_t k = adims[arank - 1], n = bdims[0] * ROWS, m = 1, nb = bdims[1];
  for (size_t i = 0; i + 1 < arank; i++) m *= adims[i];
  if (skip.value && !gamma.value)
    return error(ORT_INVALID_ARGUMENT, "MatMulQ4/Q8: a skip input (3) needs the norm weight (2)");
  if (gamma.value && (gamma.rank != 1 || gamma.dims[0] != k))
    return error(ORT_INVALID_ARGUMENT, "MatMulQ4/Q8: the norm weight (input 2) must be [K]");
  if (gamma.value && kind->eps < 0.f)
    return error(ORT_INVALID_ARGUMENT, "MatMulQ4/Q8: a norm weight needs the epsilon attribute");
  if (skip.value && (skip.rank != arank || memcmp(skip.dims, adims, sizeof(int64_t) * arank)))
    return error(ORT_INVALID_ARGUMENT, "MatMulQ4/Q8: the skip input (3) must have A's shape");
  float* sum = NULL; /* output 1, A + skip, where the node names it */
  size_t outputs = 1;
  TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT_COUNT, count_fn)(ctx, &outputs));
  if (skip.value && outputs > 1) {
    OrtValue* sv = NULL;
    TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, 1, adims, arank, &sv));
    if (sv) TRY(CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(sv, (void**)&sum));
  }
  int64_t ydims[8];
  memcpy(ydims, adims, sizeof(int64_t) * arank);
  ydims[arank - 1] = kind->swiglu ? n / 2 : n;
  OrtValue* yv;
  TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, 0, ydims, arank, &yv));
  void* yp;
  TRY(CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(yv, &yp));
  if (m == 0) return NULL;
  /* two digits: twice the int8 rows (the second M, what the first M's rounding left), and on a
     few blocks (`blocks`) which each row keeps and each group of 4 rows' union (alloc_work) */
  int64_t digits = kind->digits, blocks = digits == 2 ? kind->blocks : 0;
  if (blocks >= nb) blocks = 0; /* every block: the joined pass */
  /* Chunks of row groups (for SwiGLU, of gate groups, each with its up group). At decode on the
     library's threads (pool.c), one a thread: each streams its range of the weights as one run,
     and a thread that is late has its whole range taken over (2.6 % faster a step than 4 chunks
     a thread, Zen 5 EPYC, docs/speed.md); on onnxruntime's threads, a few a thread so that an
     uneven one evens out. At least 4 groups each, so that a chunk outweighs its dispatch. */
  int64_t groups = bdims[0], work = kind->swiglu ? groups / 2 : groups;
  int64_t pooled = pool_threads(), chunk = pooled ? (work + pooled - 1) / pooled : work / 8;
  if (chunk < 4) chunk = 4;
  if (m > 1) chunk = (groups + 15) / 16; /* prefill: more, smaller chunks */
  if (chunk < 1) chunk = 1;                /* (B with no rows) */
  /* the rows' norm and int8 blocks: on this thread at decode, over the threads for a prompt */
  Prep p = {.a = (const float*)a.data, .skip = (const float*)skip.data,
            .gamma = (const float*)gamma.data, .sum = sum, .m = m, .k = k,
            .rows = m >= 16 ? 8 : m, .eps = kind->eps, .digits = (int)digits, .blocks = blocks};
  Job j = {.y = (float*)yp, .m = m, .k = k, .n = n, .nb = nb, .groups = groups, .chunk = chunk,
           .bits = bits, .tile = tile, .swiglu = kind->swiglu, .digits = (int)digits};
  p.normed = gamma.value ? malloc(sizeof(float) * (size_t)(m * k) + 64) : NULL;
  if ((gamma.value && !p.normed) || alloc_work(&p, &j)) {
    free(p.normed);
    return error(ORT_FAIL, "MatMulQ4: out of memory");
  }
  size_t tasks = (size_t)((m + p.rows - 1) / p.rows);
  OrtStatus* st = tasks > 1
                      ? parallel(ctx, prepare_rows, tasks, &p)
                      : (prepare_rows(&p, 0), NULL);
  free(p.normed);
  if (st) return free_work(&p), st;
  j.w = held_weights(&kind->held, b.data, (size_t)(bdims[0] * bdims[1] * tile));
  size_t chunks = (size_t)((work + chunk - 1) / chunk);
  st = chunks > 1 ? parallel(ctx, run_chunk, chunks, &j)
                  : (run_chunk(&j, 0), NULL);
  free_work(&p);
  return st;
}

static OrtStatus* compute_gather(void* kernel, OrtKernelContext* ctx) {
  (void)kernel;
  Input b, ids;
  TRY(input(ctx, 0, &b));
  TRY(input(ctx, 1, &ids));
  const int64_t *bdims = b.dims, *idims = ids.dims;
  size_t irank = ids.rank;
  if (b.rank != 3 || tile_bits(bdims[2]) != 8)
    return error(ORT_INVALID_ARGUMENT,
                 "GatherQ8: B must be uint8 [N/16, K/32, 560, 544 (8-bit) or 512, 424 (6-bit)]");
  if (super_tile(bdims[2]) && bdims[1] % K4_BLOCKS)
    return error(ORT_INVALID_ARGUMENT, "GatherQ8: a 424-byte (Q6_K) tile needs K a multiple of 256");
  if (irank > 7) return error(ORT_INVALID_ARGUMENT, "GatherQ8: ids of rank above 7");
  int64_t n = bdims[0] * ROWS, k = bdims[1] * BLOCK, count = 1, odims[8];
  for (size_t i = 0; i < irank; i++) count *= idims[i], odims[i] = idims[i];
  odims[irank] = k;
  OrtValue* out;
  TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, 0, odims, irank + 1, &out));
  void* op;
  TRY(CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(out, &op));
  if (llamaonnx_gather_q8((int)bdims[2], (const uint8_t*)b.data, n, k, (const int64_t*)ids.data,
                          count, (float*)op))
    return error(ORT_INVALID_ARGUMENT, "GatherQ8: a token id is outside the vocabulary");
  return NULL;
}

typedef struct {
  int64_t heads, kv_heads;
  float scale; /* 0: 1/sqrt(head size) */
  int kv16;    /* the cache is fp16 (the op registered for float16 past/present) */
  Input cos, sin; /* where constant (constant_input) */
} AttnKernel;

static OrtStatus* compute_attention(void* kernel, OrtKernelContext* ctx) {
  const AttnKernel* kern = (const AttnKernel*)kernel;
  Input in[7]; /* qkv, past key, past value, seqlens_k, total_sequence_length, cos, sin */
  for (size_t i = 0; i < 5; i++) TRY(input(ctx, i, &in[i]));
  TRY(input_or(&kern->cos, ctx, 5, &in[5]));
  TRY(input_or(&kern->sin, ctx, 6, &in[6]));
  const int64_t *qd = in[0].dims, *kd = in[1].dims, *vd = in[2].dims, *sd = in[3].dims;
  const int64_t* cd = in[5].dims;
  int64_t h = kern->heads, hkv = kern->kv_heads;
  if (in[0].rank != 3 || in[1].rank != 4 || in[2].rank != 4 || in[3].rank != 1 ||
      in[5].rank != 2 || hkv <= 0 || h % hkv)
    return error(ORT_INVALID_ARGUMENT, "GroupQueryAttention: expects qkv [B, S, (H + 2 Hkv) D], "
                                       "past key/value [B, Hkv, L, D], seqlens_k [B], cos [P, D/2]");
  int64_t b = qd[0], s = qd[1], d = qd[2] / (h + 2 * hkv), len = kd[2];
  if (d * (h + 2 * hkv) != qd[2] || d > 512 || d % 2 || kd[0] != b || kd[1] != hkv ||
      kd[3] != d || memcmp(kd, vd, sizeof(int64_t) * 4) || sd[0] != b || cd[1] * 2 != d)
    return error(ORT_INVALID_ARGUMENT, "GroupQueryAttention: inconsistent shapes");
  void *kp = in[1].data, *vp = in[2].data;
  const int32_t* seqlens = (const int32_t*)in[3].data;
  int64_t total = *(const int32_t*)in[4].data, present = total > len ? total : len;
  int first = total == s;
  for (int64_t i = 0; i < b; i++) {
    int64_t past = first ? 0 : (int64_t)seqlens[i] + 1 - s;
    if (seqlens[i] < 0 || past < 0 || seqlens[i] + 1 > present)
      return error(ORT_INVALID_ARGUMENT, "GroupQueryAttention: seqlens_k outside the cache");
  }
  int64_t od[3] = {b, s, h * d}, pd[4] = {b, hkv, present, d};
  OrtValue *ov, *pk, *pv;
  TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, 0, od, 3, &ov));
  TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, 1, pd, 4, &pk));
  TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(ctx, 2, pd, 4, &pv));
  void *op, *pkp, *pvp;
  TRY(CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(ov, &op));
  TRY(CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(pk, &pkp));
  TRY(CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_fn)(pv, &pvp));
  /* present is past's own buffer when the caller binds them together (the runtime does); else
     past's rows are copied over first */
  size_t item = kern->kv16 ? 2 : 4;
  for (int pass = 0; pass < 2; pass++) {
    const char* from = (const char*)(pass ? vp : kp);
    char* to = (char*)(pass ? pvp : pkp);
    if (from == to) continue;
    for (int64_t r = 0; r < b * hkv; r++) {
      memcpy(to + r * present * d * item, from + r * len * d * item, item * (size_t)(len * d));
      memset(to + (r * present + len) * d * item, 0, item * (size_t)((present - len) * d));
    }
  }
  int64_t t_max = 1, group = h / hkv;
  for (int64_t i = 0; i < b; i++) t_max = seqlens[i] + 1 > t_max ? seqlens[i] + 1 : t_max;
  if (t_max > present) t_max = present;
  float scale = kern->scale != 0.f ? kern->scale : 1.f / sqrtf((float)d);
  volatile int failed = 0;
  Attn a = {(const float*)in[0].data, (const float*)in[5].data, (const float*)in[6].data,
            pkp, pvp, (float*)op, NULL, seqlens, b, s, h, hkv, d, present, cd[0], t_max,
            (t_max + ATTN_CHUNK - 1) / ATTN_CHUNK, (s + ATTN_QUERIES - 1) / ATTN_QUERIES, scale,
            first, kern->kv16, &failed};
  for (int64_t t = 0; t < b * hkv; t++) attn_store(&a, (size_t)t);
  /* At decode the step is a read of the rows' cache (from memory: the weights streamed since
     evicted it), which two threads do at nearly twice one's bandwidth; a short cache or tiny
     model is not worth waking the other threads for. A decode step shares its chunks of keys
     out (tiles.h), even a single chunk: attn_rows, a prompt's schedule (by blocks of queries),
     converts the fp16 cache into fp32 rows and transposes the keys first, which took a decode
     step 1.8–2.4× the time at 64–128 tokens of context (one GQA node, 1 and 8 rows, AVX2 EPYC),
     for the same numbers. */
  int wide = b * hkv * t_max * d * 8 >= (128 << 10) || b * h * s * t_max * d >= (1 << 18);
  int split = s == 1;
  size_t tasks = (size_t)(b * hkv * (split ? a.chunks : a.qblocks));
  if (split) {
    a.partial = malloc(sizeof(float) * tasks * (size_t)(group * (d + 2)) + 64);
    if (!a.partial) return error(ORT_FAIL, "GroupQueryAttention: out of memory");
  }
  void (*run)(void*, size_t) = split ? attn_split : attn_rows;
  OrtStatus* st = NULL;
  if (wide)
    st = parallel(ctx, run, tasks, &a);
  else
    for (size_t t = 0; t < tasks; t++) run(&a, t);
  if (!st && failed) st = error(ORT_FAIL, "GroupQueryAttention: out of memory");
  if (!st && split) attn_combine(&a);
  free(a.partial);
  return st;
}

/* OrtCustomOp, as far as its version 16 reads (CreateKernelV2 / KernelComputeV2). */
typedef struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const struct OrtCustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const struct OrtCustomOp*);
  const char* (*GetExecutionProviderType)(const struct OrtCustomOp*);
  int (*GetInputType)(const struct OrtCustomOp*, size_t);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp*);
  int (*GetOutputType)(const struct OrtCustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const struct OrtCustomOp*, size_t);
  int (*GetOutputCharacteristic)(const struct OrtCustomOp*, size_t);
  int (*GetInputMemoryType)(const struct OrtCustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp*);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp*);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp*);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp*);
  OrtStatus* (*CreateKernelV2)(const struct OrtCustomOp*, const OrtApi*, const OrtKernelInfo*,
                               void**);
  OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
} OrtCustomOp;

enum { TYPE_FLOAT = 1, TYPE_UINT8 = 2, TYPE_INT32 = 6, TYPE_INT64 = 7, TYPE_FLOAT16 = 10 };

static OrtStatus* create_kernel_v2(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* i,
                                   void** out);
static void* create_kernel(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info) {
  void* k = NULL;
  OrtStatus* st = create_kernel_v2(op, a, info, &k);
  if (st) CALL(RELEASE_STATUS, release_status_fn)(st);
  return k;
}
static const char* name_q4(const OrtCustomOp* op) { (void)op; return "MatMulQ4"; }
static const char* name_q8(const OrtCustomOp* op) { (void)op; return "MatMulQ8"; }
static const char* name_swiglu(const OrtCustomOp* op) { (void)op; return "MatMulQ4SwiGLU"; }
static const char* name_swiglu8(const OrtCustomOp* op) { (void)op; return "MatMulQ8SwiGLU"; }
static const char* name_gather(const OrtCustomOp* op) { (void)op; return "GatherQ8"; }
static const char* op_ep(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static int matmul_input(const OrtCustomOp* op, size_t i) { (void)op; return i == 1 ? TYPE_UINT8 : TYPE_FLOAT; }
static int gather_input(const OrtCustomOp* op, size_t i) { (void)op; return i == 0 ? TYPE_UINT8 : TYPE_INT64; }
static size_t two(const OrtCustomOp* op) { (void)op; return 2; }
static int output_type(const OrtCustomOp* op, size_t i) { (void)op, (void)i; return TYPE_FLOAT; }
static size_t output_count(const OrtCustomOp* op) { (void)op; return 1; }
static void compute_v1(void* k, OrtKernelContext* ctx) { (void)compute(k, ctx); }
static void gather_v1(void* k, OrtKernelContext* ctx) { (void)compute_gather(k, ctx); }
static void destroy_kernel(void* k) {
  held_release(((Kind*)k)->held);
  free(k);
}
static int required(const OrtCustomOp* op, size_t i) { (void)op, (void)i; return 0; }
/* inputs A, B required; gamma, skip optional; output 1 (A + skip) optional */
static size_t four(const OrtCustomOp* op) { (void)op; return 4; }
static size_t two_outputs(const OrtCustomOp* op) { (void)op; return 2; }
static int optional_from_2(const OrtCustomOp* op, size_t i) { (void)op; return i >= 2; }
static int optional_from_1(const OrtCustomOp* op, size_t i) { (void)op; return i >= 1; }
static int default_memory(const OrtCustomOp* op, size_t i) { (void)op, (void)i; return 0; }
static int one(const OrtCustomOp* op) { (void)op; return 1; }

#define MATMUL_OP(name)                                                                      \
  {16,          create_kernel, name,           op_ep,           matmul_input,    four,       \
   output_type, two_outputs,   compute_v1,     destroy_kernel,  optional_from_2, optional_from_1, \
   default_memory, one,        one,            one,             one,             create_kernel_v2, \
   compute}
static const OrtCustomOp matmul_q4 = MATMUL_OP(name_q4);
static const OrtCustomOp matmul_q8 = MATMUL_OP(name_q8);
static const OrtCustomOp matmul_q4_swiglu = MATMUL_OP(name_swiglu);
static const OrtCustomOp matmul_q8_swiglu = MATMUL_OP(name_swiglu8);
static const char* name_attention(const OrtCustomOp* op) { (void)op; return "GroupQueryAttention"; }
static const OrtCustomOp attention16;
/* the cache (inputs 1, 2 and outputs 1, 2) is float, or float16 for the op's second registration */
static int attention_input(const OrtCustomOp* op, size_t i) {
  if (i == 3 || i == 4) return TYPE_INT32;
  return (i == 1 || i == 2) && op == &attention16 ? TYPE_FLOAT16 : TYPE_FLOAT;
}
static int attention_output(const OrtCustomOp* op, size_t i) {
  return i > 0 && op == &attention16 ? TYPE_FLOAT16 : TYPE_FLOAT;
}
static size_t seven(const OrtCustomOp* op) { (void)op; return 7; }
static size_t three(const OrtCustomOp* op) { (void)op; return 3; }
static void attention_v1(void* k, OrtKernelContext* ctx) { (void)compute_attention(k, ctx); }
static void destroy_attention(void* k) { free(k); }
static OrtStatus* create_attention(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info,
                                   void** out) {
  (void)a;
  AttnKernel* k = calloc(1, sizeof(AttnKernel));
  if (!k) return error(ORT_FAIL, "GroupQueryAttention: out of memory");
  k->kv16 = op == &attention16;
  OrtStatus* st = CALL(KERNEL_INFO_GET_ATTRIBUTE_INT64, attr_int_fn)(info, "num_heads", &k->heads);
  if (!st) st = CALL(KERNEL_INFO_GET_ATTRIBUTE_INT64, attr_int_fn)(info, "kv_num_heads", &k->kv_heads);
  if (st) return free(k), st;
  OrtStatus* none = CALL(KERNEL_INFO_GET_ATTRIBUTE_FLOAT, attr_float_fn)(info, "scale", &k->scale);
  if (none) { /* no scale attribute: 1/sqrt(head size) */
    CALL(RELEASE_STATUS, release_status_fn)(none);
    k->scale = 0.f;
  }
  constant_input(info, 5, &k->cos);
  constant_input(info, 6, &k->sin);
  *out = k;
  return NULL;
}
static void* create_attention_v1(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* i) {
  void* k = NULL;
  OrtStatus* st = create_attention(op, a, i, &k);
  if (st) CALL(RELEASE_STATUS, release_status_fn)(st);
  return k;
}
#define ATTENTION_OP                                                                       \
  {16,            create_attention_v1, name_attention, op_ep,    attention_input, seven,     \
   attention_output, three,            attention_v1,   destroy_attention, required, required, \
   default_memory, one,                one,            one,      one,             create_attention, \
   compute_attention}
/* one op, registered twice: onnxruntime picks the kernel whose types the node's inputs have */
static const OrtCustomOp attention = ATTENTION_OP;
static const OrtCustomOp attention16 = ATTENTION_OP;

static const OrtCustomOp gather_q8 = {
    16,           create_kernel, name_gather,   op_ep,    gather_input,   two,
    output_type,  output_count,  gather_v1,     destroy_kernel, required, required,
    default_memory, one,         one,           one,      one,            create_kernel_v2,
    compute_gather,
};

/* The node's `layout` attribute (1 where it has none: folders packed before nodes carried it)
   against the tile layouts this library reads (tiles.h, TILE_LAYOUT): an error that says what to
   do, not tiles read in another layout. */
static OrtStatus* check_layout(const OrtKernelInfo* info) {
  int64_t layout = 1;
  OrtStatus* none = CALL(KERNEL_INFO_GET_ATTRIBUTE_INT64, attr_int_fn)(info, "layout", &layout);
  if (none) CALL(RELEASE_STATUS, release_status_fn)(none), layout = 1;
  if (layout >= TILE_LAYOUT_OLDEST && layout <= TILE_LAYOUT) return NULL;
  char reads[64], msg[400];
  if (TILE_LAYOUT_OLDEST == TILE_LAYOUT) snprintf(reads, sizeof reads, "revision %d", TILE_LAYOUT);
  else snprintf(reads, sizeof reads, "revisions %d to %d", TILE_LAYOUT_OLDEST, TILE_LAYOUT);
  snprintf(msg, sizeof msg,
           "llamaonnx kernels: the model's tiles are packed in tile layout revision %lld, and this "
           "kernel library reads %s: %s",
           (long long)layout, reads,
           layout > TILE_LAYOUT ? "run it with the newer llamaonnx that wrote it"
                                : "quantize it again with this llamaonnx (`llamaonnx quantize`)");
  return error(ORT_INVALID_ARGUMENT, msg);
}

/* The kernel state: the op's weight format, and for the matmul ops their RMSNorm's epsilon. */
static OrtStatus* create_kernel_v2(const OrtCustomOp* op, const OrtApi* a, const OrtKernelInfo* info,
                                   void** out) {
  (void)a;
  TRY(check_layout(info));
  Kind* k = calloc(1, sizeof(Kind));
  if (!k) return error(ORT_FAIL, "MatMulQ4: out of memory");
  k->bits = op == &matmul_q8 || op == &matmul_q8_swiglu ? 8 : 4;
  k->swiglu = op == &matmul_q4_swiglu || op == &matmul_q8_swiglu;
  k->eps = -1.f;
  if (op != &gather_q8) {
    OrtStatus* none = CALL(KERNEL_INFO_GET_ATTRIBUTE_FLOAT, attr_float_fn)(info, "epsilon", &k->eps);
    if (none) CALL(RELEASE_STATUS, release_status_fn)(none), k->eps = -1.f; /* no norm folded in */
    int64_t digits = 1;
    none = CALL(KERNEL_INFO_GET_ATTRIBUTE_INT64, attr_int_fn)(info, "digits", &digits);
    if (none) CALL(RELEASE_STATUS, release_status_fn)(none), digits = 1;
    if (digits != 1 && digits != 2) {
      free(k);
      return error(ORT_INVALID_ARGUMENT, "MatMulQ4/Q8: attribute digits must be 1 or 2");
    }
    k->digits = (int)digits;
    none = CALL(KERNEL_INFO_GET_ATTRIBUTE_INT64, attr_int_fn)(info, "blocks", &k->blocks);
    if (none) CALL(RELEASE_STATUS, release_status_fn)(none), k->blocks = 0;
    if (k->blocks < 0) {
      free(k);
      return error(ORT_INVALID_ARGUMENT, "MatMulQ4/Q8: attribute blocks must be >= 0 (0: all)");
    }
    constant_input(info, 1, &k->b);
    constant_input(info, 2, &k->gamma);
  }
  *out = k;
  return NULL;
}

static const char* check_api(const OrtApiBase* base) {
  const OrtApi* table = base->GetApi(API_VERSION);
  if (!table) return "this onnxruntime does not offer C API version 17 (onnxruntime >= 1.17)";
  api = (const void* const*)table;
  /* (the version string, not GetApi(24): an older onnxruntime prints an error for that) */
  int major = 0, minor = 0;
  const char* version = base->GetVersionString ? base->GetVersionString() : NULL;
  const char* by_copy = getenv("LLAMAONNX_SHAPES_BY_COPY");
  shape_by_reference = version && sscanf(version, "%d.%d", &major, &minor) == 2 &&
                       (major > 1 || (major == 1 && minor >= 24)) &&
                       !(by_copy && *by_copy && strcmp(by_copy, "0"));
  const char* info = CALL(GET_BUILD_INFO_STRING, build_info_fn)();
  if (!info || strncmp(info, "ORT Build Info", 14) != 0)
    return "onnxruntime's C API table is not laid out as this library expects";
  return NULL;
}

/* The entry point onnxruntime calls for SessionOptions.register_custom_ops_library. */
OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  const char* problem = check_api(base);
  if (problem) {
    if (!api) return NULL; /* no table to build a status with; the op stays unregistered */
    return error(ORT_FAIL, problem);
  }
  OrtCustomOpDomain* domain;
  TRY(CALL(CREATE_CUSTOM_OP_DOMAIN, create_domain_fn)("ai.llamaonnx", &domain));
  TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_fn)(domain, &matmul_q4));
  TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_fn)(domain, &matmul_q8));
  TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_fn)(domain, &matmul_q4_swiglu));
  TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_fn)(domain, &matmul_q8_swiglu));
  TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_fn)(domain, &attention));
  TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_fn)(domain, &attention16));
  TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_fn)(domain, &gather_q8));
  return CALL(ADD_CUSTOM_OP_DOMAIN, add_domain_fn)(options, domain);
}
