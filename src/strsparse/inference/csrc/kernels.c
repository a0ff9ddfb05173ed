/*
 * Sparse CPU kernels for strsparse's inference runtime.
 *
 * Plain C (no torch headers), called through ctypes. One generic kernel does the work of
 * every sparse Linear and Conv layer:
 *
 *     out[co * ld_out + p] = clamp(bias[co] + sum_j values[j] * in[offsets[j] + p], lo, hi)
 *                            for j in [row_ptr[co], row_ptr[co + 1]), p in [0, n_pix)
 *
 * Activations are channel-major (each channel's pixels contiguous), weights are sparse by
 * output channel with a precomputed input offset per nonzero, so a k x k convolution is a sum
 * of shifted 1-D windows over a zero-padded input (strided convs read "parity planes", see
 * ss_pad_planes), or over the unpadded input with each load masked to the pixels whose window
 * lies inside the image (ss_spmm_shifted). Pixels are processed in tiles held in SIMD
 * accumulators (8 vectors: 128 floats with AVX-512, 64 with AVX2; 16 vectors for a shifted
 * product), output channels looping inside a tile; products over large tensors stream their
 * output past the caches and prefetch each next tile's input (see large_mode); a Linear layer
 * of many inputs computes each tile in runs over its inputs (ss_spmm_chunked). The instruction
 * set is picked at run time (target attributes + __builtin_cpu_supports), not at build time.
 * Work is split over pixel tiles and blocks of output channels on a small thread pool.
 * Depthwise convs have a kernel of their own (ss_depthwise), one (channel, image) plane at a
 * time.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* pthread_setname_np */
#endif
#ifndef SS_NO_PYTHON
#include <Python.h>
#endif
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define SS_X86 1
#include <immintrin.h>
#else
#define SS_X86 0
#endif

#define SS_EXPORT __attribute__((visibility("default")))

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

#ifndef SS_SOURCE_HASH
#define SS_SOURCE_HASH "unknown"
#endif

/* A digest of this file, set by the build, so that a library built from an older version of
 * it is not used. */
SS_EXPORT const char *ss_source_hash(void) { return SS_SOURCE_HASH; }

/* ------------------------------------------------------------------------------------------ */
/* Thread pool. The calling thread and up to threads-1 workers take chunks of the items from
 * a shared counter, so a worker that the OS runs late (a busy machine) finds the work done
 * instead of holding the caller up: the caller only ever waits for chunks being computed. */

typedef void (*task_fn)(void *ctx, int64_t begin, int64_t end);

#define SS_MAX_THREADS 64
#define SS_SPIN 2000
/* below this much work a call runs on the calling thread: waking workers would cost more.
 * Lowered 4x and 8x from 2**18 and 2**16 (ResNet-50 at batch 1, 2 threads: 1.02x faster;
 * MobileNetV1, whose depthwise layers are small: 1.08x; lower still gained nothing) */
#define SS_SERIAL_MACS (1 << 16)
#define SS_SERIAL_VALUES (1 << 13)

static pthread_mutex_t submit_mu = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static pthread_mutex_t wait_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wait_cv = PTHREAD_COND_INITIALIZER;
static int n_workers = 0;          /* threads started (ids 1..n_workers) */
static atomic_long job_gen;        /* bumped for every job; workers wake on a change */
static atomic_long job_open;       /* the generation workers may join, 0 once it closes */
static atomic_int job_active;      /* workers inside the job */
static atomic_llong job_next;      /* next unclaimed item */
static atomic_llong job_done;      /* items finished */
static task_fn job_fn;
static void *job_ctx;
static int64_t job_items, job_chunk;
static int job_threads;
/* the most threads a call from this thread may use (0: no limit): a caller running beside
 * others of its own (slices of a batch on threads of their own) keeps to itself */
static _Thread_local int thread_limit = 0;

/* Limit the calls made from the calling thread to `threads` threads (0: no limit); returns
 * the previous limit. */
SS_EXPORT int ss_set_thread_limit(int threads) {
    const int old = thread_limit;
    thread_limit = threads > 0 ? threads : 0;
    return old;
}

static inline int allowed_threads(int threads) {
    if (threads > SS_MAX_THREADS) threads = SS_MAX_THREADS;
    return thread_limit > 0 && threads > thread_limit ? thread_limit : threads;
}

/* A job may return before its work is done (a layer whose output only the next native call
 * reads, so that the caller's Python between the two overlaps the workers' computing): it
 * stays open, with its context copied here, until the next call (from any thread) finishes
 * it; a caller that launched one finishes it before anything else it does. */
#define SS_EARLY_CTX 4096
static _Alignas(64) unsigned char early_ctx[SS_EARLY_CTX];
static int job_pending = 0;                   /* under submit_mu */
static _Thread_local int launched_early = 0;

static inline void cpu_relax(void) {
#if SS_X86
    _mm_pause();
#endif
}

/* How far apart two threads run. On a virtual machine the host may move the two virtual CPUs
 * so that they share no cache for a while: then every line one thread reads of what the other
 * wrote in the layer before comes from the far cache, and a network at batch 1 ran slower on
 * two threads than on one (ResNet-50 at 95.15%: 15.6 ms against 11.8, where it takes 6.3 ms
 * with the CPUs near). The worker measures how long a job takes to reach it while it spins
 * (one cache line's trip, and the caller's few stores before); the least of each
 * SS_FAR_WINDOW such hand-offs, above SS_FAR_NS, means far (about 250-300 ns, against
 * 70-130 ns near, on a virtual machine whose CPUs came and went between the two). A job for
 * two threads then runs on the caller alone, unless it is large (SS_FAR_MACS), and two jobs
 * in every SS_FAR_PROBE still go out, the first to wake the worker, the second to be
 * measured, so that the measure follows the CPUs when they come near again (ResNet-50 at
 * batch 1, far: 15.8 ms with every job going out, 12.6 ms with 2 in 16, 10.9 with 2 in 64,
 * where one thread takes 11.8 ms). */
#define SS_FAR_NS 180
#define SS_FAR_WINDOW 16
#define SS_FAR_PROBE 64
#define SS_FAR_MACS (1LL << 26)
#define SS_FAR_CLOCK_NS 100 /* the most a clock reading may cost for the measure */
static atomic_llong job_published_ns; /* when the open job was published */
static atomic_llong handoff_ns;       /* the least hand-off of the last window, 0 before one */
static atomic_int far_jobs;           /* two-thread jobs seen while far */
static int far_mode_setting = -1;     /* -1: measured, 0: never far, 1: always far */

static inline int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Whether reading the clock costs less than a cache line's trip: a clock that is a system
 * call (where the virtual machine offers no fast one) cannot tell near from far. */
static int clock_is_cheap(void) {
    int64_t cost = INT64_MAX;
    for (int k = 0; k < 8; k++) {
        const int64_t t = now_ns(), d = now_ns() - t;
        if (d < cost) cost = d;
    }
    return cost < SS_FAR_CLOCK_NS;
}

/* Whether a job that may run alone should, now. */
static int run_alone(void) {
    if (far_mode_setting == 0) return 0;
    if (far_mode_setting < 0 && atomic_load(&handoff_ns) <= SS_FAR_NS) return 0;
    return atomic_fetch_add(&far_jobs, 1) % SS_FAR_PROBE >= 2;
}

/* How many two-thread jobs came while the threads were far (those that went out included). */
SS_EXPORT int64_t ss_far_jobs(void) { return atomic_load(&far_jobs); }

/* Set how two threads' distance is taken (-1: measured, 0: never far, 1: always far), and
 * return the last measure in ns (0 before one). */
SS_EXPORT int64_t ss_far_mode(int setting) {
    far_mode_setting = setting < 0 ? -1 : (setting > 0 ? 1 : 0);
    return atomic_load(&handoff_ns);
}

static void take_chunks(void) {
    for (;;) {
        const int64_t begin = atomic_fetch_add(&job_next, job_chunk);
        if (begin >= job_items) return;
        const int64_t end = begin + job_chunk < job_items ? begin + job_chunk : job_items;
        job_fn(job_ctx, begin, end);
        atomic_fetch_add(&job_done, end - begin);
    }
}

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg;
#ifdef __linux__
    pthread_setname_np(pthread_self(), "strsparse"); /* what top -H and debuggers show */
#endif
    long seen = atomic_load(&job_gen);
    int64_t least = INT64_MAX, measured = 0;
    const int measure = id == 1 && clock_is_cheap();
    for (;;) {
        int spins = 0;
        while (atomic_load(&job_gen) == seen) {
            if (++spins < SS_SPIN) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&wait_mu);
            while (atomic_load(&job_gen) == seen) pthread_cond_wait(&wait_cv, &wait_mu);
            pthread_mutex_unlock(&wait_mu);
        }
        seen = atomic_load(&job_gen);
        if (measure && spins < SS_SPIN) { /* it came while this worker spun: a hand-off */
            const int64_t d = now_ns() - atomic_load(&job_published_ns);
            if (d < least) least = d;
            /* while far, few jobs come out to be measured: a shorter window notices sooner
             * that the CPUs came near again */
            const int64_t window = atomic_load(&handoff_ns) > SS_FAR_NS ? SS_FAR_WINDOW / 4
                                                                         : SS_FAR_WINDOW;
            if (++measured >= window) {
                atomic_store(&handoff_ns, least);
                least = INT64_MAX;
                measured = 0;
            }
        }
        atomic_fetch_add(&job_active, 1);
        /* the job's fields are stable while it is open and this worker counts as active */
        if (atomic_load(&job_open) == seen && id < job_threads) take_chunks();
        atomic_fetch_sub(&job_active, 1);
    }
    return NULL;
}

static void after_fork_child(void) {
    /* the workers do not exist in a forked child: start afresh */
    n_workers = 0;
    pthread_mutex_init(&submit_mu, NULL);
    pthread_mutex_init(&wait_mu, NULL);
    pthread_cond_init(&wait_cv, NULL);
    atomic_store(&job_open, 0);
    atomic_store(&job_active, 0);
    job_pending = 0;
    launched_early = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void install_atfork(void) { pthread_atfork(NULL, NULL, after_fork_child); }

static void wait_until(atomic_llong *value, int64_t target) {
    for (long spins = 0; atomic_load(value) < target; spins++) {
        if (spins < SS_SPIN) cpu_relax();
        else sched_yield();
    }
}

/* With submit_mu held: help finish the job that returned early, if any, and close it. */
static void finish_pending(void) {
    if (!job_pending) return;
    take_chunks();
    wait_until(&job_done, job_items);
    atomic_store(&job_open, 0);
    while (atomic_load(&job_active) > 0) cpu_relax(); /* workers still looking at the job */
    job_pending = 0;
}

/* Finish the job this thread launched to return early, if it is still open. */
SS_EXPORT void ss_sync(void) {
    if (!launched_early) return;
    pthread_mutex_lock(&submit_mu);
    finish_pending();
    launched_early = 0;
    pthread_mutex_unlock(&submit_mu);
}

/* fn(ctx, begin, end) over [0, items) on up to `threads` threads. early_size > 0: return as
 * soon as the workers have the job, with ctx (early_size bytes) copied for them and `fixup`
 * applied to the copy; the work is finished by the next call (see early_ctx). */
static void parallel_run(int threads, int64_t items, task_fn fn, void *ctx, size_t early_size,
                         void (*fixup)(void *copy), int may_run_alone) {
    threads = allowed_threads(threads);
    if (threads == 2 && may_run_alone && items > 1 && run_alone()) threads = 1;
    if (threads > items) threads = (int)items;
    if (threads <= 1) {
        ss_sync();
        if (items > 0) fn(ctx, 0, items);
        return;
    }
    pthread_once(&atfork_once, install_atfork);
    pthread_mutex_lock(&submit_mu);
    finish_pending();
    launched_early = 0;
    while (n_workers < threads - 1) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker_main, (void *)(intptr_t)(n_workers + 1)) != 0) break;
        pthread_detach(t);
        n_workers++;
    }
    const int early = early_size > 0 && early_size <= SS_EARLY_CTX && n_workers > 0;
    if (early) {
        memcpy(early_ctx, ctx, early_size);
        if (fixup) fixup(early_ctx);
        ctx = early_ctx;
    }
    job_fn = fn;
    job_ctx = ctx;
    job_items = items;
    job_chunk = items / (4 * (int64_t)threads);
    if (job_chunk < 1) job_chunk = 1;
    job_threads = threads;
    atomic_store(&job_next, 0);
    atomic_store(&job_done, 0);
    pthread_mutex_lock(&wait_mu);
    atomic_store(&job_published_ns, now_ns());
    const long gen = atomic_load(&job_gen) + 1;
    atomic_store(&job_open, gen);
    atomic_store(&job_gen, gen);
    pthread_cond_broadcast(&wait_cv);
    pthread_mutex_unlock(&wait_mu);
    job_pending = 1;
    if (early) {
        launched_early = 1;
    } else {
        finish_pending(); /* the caller computes too */
    }
    pthread_mutex_unlock(&submit_mu);
}

static void parallel_for(int threads, int64_t items, task_fn fn, void *ctx) {
    parallel_run(threads, items, fn, ctx, 0, NULL, 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Recording. A thread may record the calls it makes to the functions below (an opcode and
 * the arguments, pointers as addresses, floats as their bits); Python moves the pointers
 * into an arena of its own, and ss_run_plan then replays a network's whole forward pass in
 * one call, with no Python between the layers. */

enum {
    OP_SPMM = 1,
    OP_SPMM_MAPPED,
    OP_SPMM_WINDOWS,
    OP_ZERO,
    OP_PAD_PLANES,
    OP_SUBSAMPLE,
    OP_COMPACT,
    OP_MAXPOOL,
    OP_PLANE_MEAN,
    OP_DEPTHWISE,
    OP_SWAP01,
    OP_SPMM_SHIFTED,
    OP_SPMM_CHUNKED,
};
#define SS_MAX_ARGS 24

static _Thread_local int64_t *rec_words;
static _Thread_local int64_t rec_len, rec_cap;
static _Thread_local int rec_on, rec_failed;

#define RP(p) ((int64_t)(intptr_t)(p))

static inline int64_t float_bits(float f) {
    int32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

static inline float bits_float(int64_t v) {
    const int32_t bits = (int32_t)v;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Append [op, n, args...] to this thread's recording. */
static void rec_push(int op, int n, const int64_t *args) {
    if (rec_len + 2 + n > rec_cap) {
        const int64_t cap = 2 * rec_cap + 2 + n + 1024;
        int64_t *grown = (int64_t *)realloc(rec_words, sizeof(int64_t) * (size_t)cap);
        if (!grown) {
            rec_failed = 1;
            return;
        }
        rec_words = grown;
        rec_cap = cap;
    }
    rec_words[rec_len++] = op;
    rec_words[rec_len++] = n;
    memcpy(rec_words + rec_len, args, sizeof(int64_t) * (size_t)n);
    rec_len += n;
}

#define RECORD(op, ...)                                                                    \
    do {                                                                                   \
        if (rec_on) {                                                                      \
            const int64_t rec_args_[] = {__VA_ARGS__};                                     \
            rec_push(op, (int)(sizeof rec_args_ / sizeof rec_args_[0]), rec_args_);        \
        }                                                                                  \
    } while (0)

/* Start recording this thread's calls (they still run), dropping any earlier recording. */
SS_EXPORT void ss_record_begin(void) {
    rec_len = 0;
    rec_failed = 0;
    rec_on = 1;
}

/* Stop recording; returns the number of words recorded (-1 if memory ran out), which
 * ss_record_take copies out. */
SS_EXPORT int64_t ss_record_end(void) {
    rec_on = 0;
    return rec_failed ? -1 : rec_len;
}

/* Copy the recording (ss_record_end's count of words) to dst and free it. */
SS_EXPORT void ss_record_take(int64_t *dst) {
    if (dst && rec_words) memcpy(dst, rec_words, sizeof(int64_t) * (size_t)rec_len);
    free(rec_words);
    rec_words = NULL;
    rec_len = rec_cap = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The sparse kernel.                                                                          */

typedef struct {
    const float *in;
    float *out;
    const float *values;
    const int32_t *offsets;
    const int32_t *row_ptr;
    const float *bias; /* may be NULL */
    const float *residual; /* may be NULL; same layout as out with its own stride */
    int64_t c_out, n_pix, ld_out, ld_res;
    float lo, hi;
    int64_t tile, n_tiles, n_blocks;
    const int64_t *block_start; /* n_blocks + 1 output-channel boundaries */
    const int64_t *map; /* NULL, or where each output pixel goes (see ss_spmm_mapped) */
    /* NULL, or the distinct input offsets (windows) of the nonzeros, each copied once per
     * tile into an aligned buffer that the product then reads (see spmm_mapped_body) */
    const int32_t *windows;
    const int32_t *window_offsets; /* per nonzero: slot * tile in that buffer */
    int64_t n_windows;
    /* NULL, or per nonzero which of the n_taps (dy, dx) shifts of an image of img_h x img_w
     * pixels it reads at (a shifted product, see ss_spmm_shifted) */
    const int32_t *taps;
    const int32_t *shifts;
    int64_t n_taps, img_h, img_w;
    /* a shifted product's masks for the tile being computed: bit q of
     * tile_mask[tap * SS_MASK_ROW + q / 16] is set where the tile's pixel q reads inside the
     * image (see shifted_masks) */
    const uint16_t *tile_mask;
    /* write the output with non-temporal stores (see large_mode) */
    int stream;
    /* NULL, or where (in floats, before p0) the inputs the product reads start: the next
     * tile's lines are prefetched while this one is computed */
    const int64_t *ahead;
    int64_t n_ahead, ahead_reach;
    /* the nonzeros in n_chunks runs by input column (row_ptr: n_chunks row pointers of c_out
     * + 1 each, see ss_spmm_chunked); the tile functions then add to what the runs before
     * left in out (partial_in) and leave their sums there as they are (partial_out) */
    int64_t n_chunks;
    int partial_in, partial_out;
} spmm_args;

#define SS_MAX_TILE 128 /* tiles are at most this wide, but a shifted product's (below) */
/* a shifted product's tiles with AVX-512 when not mapped: 3x3 convs at 98-99% ran 1.02-1.06x
 * faster than in 128-pixel tiles, other products gained little or nothing */
#define SS_WIDE_TILE 256
#define SS_MASK_ROW (SS_WIDE_TILE / 16)
#define SS_MAX_TAPS 64

SS_EXPORT int ss_isa(void);

/* Products over large tensors (SS_LARGE_BYTES and more: 3x3 and 1x1 convs at batch 8 on
 * 56x56) are bound by memory, whose hardware prefetchers cannot follow one stream a channel.
 * They write their output with non-temporal stores (which need not read the lines first),
 * and prefetch the next tile's input lines while a tile is computed. Each alone, with AVX-512
 * on 1 thread (interleaved in one process): the stores made 3x3 and 1x1 layers at 98-99%
 * 1.17-1.24x faster; the prefetch 1.05-1.11x on 3x3 and 1.07-1.46x on 1x1 layers, but
 * 0.88-0.91x where one tile's inputs took 256 KB (1x1 512->512 on 28x28 at 99%), hence
 * SS_AHEAD_TILE_BYTES. ResNet-50 at batch 8 gained 1.00-1.02x from each. -1: by size, 0:
 * never, 1: always (tests). */
static int large_mode = -1;
#define SS_LARGE_BYTES (8 << 20)
#define SS_AHEAD_TILE_BYTES (128 << 10)
#define SS_AHEAD_CHANNELS 8 /* prefetches go out between blocks of this many channels */

/* A shifted product's masks for tile [p0, p0 + np) (see spmm_args.tile_mask): pixel p is
 * (y, x) = (p / w % h, p % w), and tap (dy, dx) reads inside the image where
 * 0 <= y + dy < h and 0 <= x + dx < w. */
static void shifted_masks_portable(const spmm_args *a, int64_t p0, int64_t np, uint16_t *mask) {
    int32_t ys[SS_WIDE_TILE], xs[SS_WIDE_TILE];
    const int64_t h = a->img_h, w = a->img_w;
    int64_t x = p0 % w, y = p0 / w % h;
    for (int64_t q = 0; q < np; q++) {
        ys[q] = (int32_t)y;
        xs[q] = (int32_t)x;
        if (++x == w) {
            x = 0;
            if (++y == h) y = 0;
        }
    }
    const int64_t groups = (np + 15) / 16;
    for (int64_t t = 0; t < a->n_taps; t++) {
        const int32_t dy = a->shifts[2 * t], dx = a->shifts[2 * t + 1];
        for (int64_t g = 0; g < groups; g++) {
            const int64_t q0 = 16 * g, q1 = q0 + 16 < np ? q0 + 16 : np;
            uint32_t bits = 0;
            for (int64_t q = q0; q < q1; q++)
                bits |= (uint32_t)((uint32_t)(ys[q] + dy) < (uint32_t)h &&
                                   (uint32_t)(xs[q] + dx) < (uint32_t)w)
                        << (q - q0);
            mask[t * SS_MASK_ROW + g] = (uint16_t)bits;
        }
    }
}

#if SS_X86
/* The same masks, 16 pixels at a time: (y, x) of a vector of pixels, then two compares a tap.
 * The scalar loop took a tenth of a 3x3 product at 99% on 56x56 (28 of 289 us). */
__attribute__((target("avx512f"))) static void
shifted_masks_avx512(const spmm_args *a, int64_t p0, int64_t np, uint16_t *mask) {
    const int32_t h = (int32_t)a->img_h, w = (int32_t)a->img_w;
    int32_t first[2][16];
    int32_t x = (int32_t)(p0 % w), y = (int32_t)(p0 / w % h);
    for (int q = 0; q < 16; q++) {
        first[0][q] = y;
        first[1][q] = x;
        if (++x == w) {
            x = 0;
            if (++y == h) y = 0;
        }
    }
    __m512i vy = _mm512_loadu_si512((const void *)first[0]);
    __m512i vx = _mm512_loadu_si512((const void *)first[1]);
    const __m512i vh = _mm512_set1_epi32(h), vw = _mm512_set1_epi32(w);
    /* 16 pixels on: x + 16 % w, carried into y + 16 / w, y wrapped into the image */
    const __m512i dx16 = _mm512_set1_epi32(16 % w), dy16 = _mm512_set1_epi32(16 / w);
    const __m512i one = _mm512_set1_epi32(1);
    const int64_t groups = (np + 15) / 16;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t left = np - 16 * g;
        const __mmask16 live = (__mmask16)(left >= 16 ? 0xFFFF : ((1u << left) - 1u));
        for (int64_t t = 0; t < a->n_taps; t++) {
            const __m512i ty = _mm512_add_epi32(vy, _mm512_set1_epi32(a->shifts[2 * t]));
            const __m512i tx = _mm512_add_epi32(vx, _mm512_set1_epi32(a->shifts[2 * t + 1]));
            mask[t * SS_MASK_ROW + g] = (uint16_t)_mm512_mask_cmplt_epu32_mask(
                _mm512_mask_cmplt_epu32_mask(live, ty, vh), tx, vw);
        }
        vx = _mm512_add_epi32(vx, dx16);
        vy = _mm512_add_epi32(vy, dy16);
        const __mmask16 carry = _mm512_cmpge_epi32_mask(vx, vw);
        vx = _mm512_mask_sub_epi32(vx, carry, vx, vw);
        vy = _mm512_mask_add_epi32(vy, carry, vy, one);
        for (__mmask16 over = _mm512_cmpge_epi32_mask(vy, vh); over;
             over = _mm512_cmpge_epi32_mask(vy, vh))
            vy = _mm512_mask_sub_epi32(vy, over, vy, vh);
    }
}
#endif

static void shifted_masks(const spmm_args *a, int64_t p0, int64_t np, uint16_t *mask) {
#if SS_X86
    if (ss_isa() == ISA_AVX512) {
        shifted_masks_avx512(a, p0, np, mask);
        return;
    }
#endif
    shifted_masks_portable(a, p0, np, mask);
}

/* Eight bytes from p, whatever their type and alignment (one load). */
static inline uint64_t load_u64(const void *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

static void spmm_tile_portable(const spmm_args *a, int64_t c0, int64_t c1, int64_t p0, int64_t np) {
    float acc[32];
    for (int64_t co = c0; co < c1; co++) {
        float *dst = a->out + co * a->ld_out + p0;
        for (int64_t k = 0; k < np; k++) acc[k] = a->partial_in ? dst[k] : 0.0f;
        for (int32_t j = a->row_ptr[co]; j < a->row_ptr[co + 1]; j++) {
            const float w = a->values[j];
            const float *src = a->in + a->offsets[j] + p0;
            if (a->taps) {
                const uint16_t *m = a->tile_mask + a->taps[j] * SS_MASK_ROW;
                for (int64_t k = 0; k < np; k++)
                    if (m[k / 16] >> (k % 16) & 1) acc[k] += w * src[k];
            } else {
                for (int64_t k = 0; k < np; k++) acc[k] += w * src[k];
            }
        }
        if (a->partial_out) {
            for (int64_t k = 0; k < np; k++) dst[k] = acc[k];
            continue;
        }
        const float b = a->bias ? a->bias[co] : 0.0f;
        const float *res = a->residual ? a->residual + co * a->ld_res + p0 : NULL;
        for (int64_t k = 0; k < np; k++) {
            float v = acc[k] + b;
            if (res) v += res[k];
            dst[k] = clampf(v, a->lo, a->hi);
        }
    }
}

#if SS_X86
/* NV vectors of 16 floats (up to 8, 16 for a shifted product); the last one masked by `last`.
 * Inlined with a constant NV. */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
spmm_tile_avx512_nv(const spmm_args *a, int64_t c0, int64_t c1, int64_t p0, const int nv,
                    const int full, __mmask16 last, const int shifted) {
    /* masked loads and stores only for the last vector of a partial tile: on some CPUs
     * (AMD Zen 4) masked stores are far slower than plain ones */
    __mmask16 m[16];
    for (int k = 0; k < 16; k++) m[k] = k < nv - 1 ? (__mmask16)0xFFFF : last;
#define LOAD512(k, p) \
    ((k) < nv - 1 || full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m[(k)], (p)))
    /* a shifted product's input: every load masked by its tap (the tile's end included); the
     * tap's masks read four at a time, as 64-bit words: 3x3 convs at 98-99% ran 1.02-1.05x
     * faster than with one 16-bit load each (medians of five alternated processes) */
#define INPUT512(k, p, j) (shifted ? _mm512_maskz_loadu_ps(TAP_MASK(j, k), (p)) : LOAD512(k, p))
#define TAP_MASK(j, k)                                                                     \
    ((__mmask16)(load_u64(a->tile_mask + a->taps[j] * SS_MASK_ROW + (k) / 4 * 4) >>         \
                 (16 * ((k) % 4))))
    const __m512 vlo = _mm512_set1_ps(a->lo), vhi = _mm512_set1_ps(a->hi);
    /* U independent sums of every vector (nonzeros taken in turn), so that short tiles are
     * not bound by the FMA latency: 8 or more chains in flight */
    const int U = nv <= 2 ? 4 : (nv <= 7 ? 2 : 1);
    for (int64_t co = c0; co < c1; co++) {
        __m512 acc[16], more[3][16];
        float *dst = a->out + co * a->ld_out + p0;
        for (int k = 0; k < nv; k++)
            acc[k] = a->partial_in ? LOAD512(k, dst + 16 * k) : _mm512_setzero_ps();
        for (int u = 0; u < U - 1; u++)
            for (int k = 0; k < nv; k++) more[u][k] = _mm512_setzero_ps();
        const int32_t j1 = a->row_ptr[co + 1];
        int32_t j = a->row_ptr[co];
        const float *in = a->in + p0;
        for (; j + U <= j1; j += U) {
            const __m512 w = _mm512_set1_ps(a->values[j]);
            const float *src = in + a->offsets[j];
            for (int k = 0; k < nv; k++)
                acc[k] = _mm512_fmadd_ps(w, INPUT512(k, src + 16 * k, j), acc[k]);
            for (int u = 0; u < U - 1; u++) {
                const __m512 wu = _mm512_set1_ps(a->values[j + 1 + u]);
                const float *su = in + a->offsets[j + 1 + u];
                for (int k = 0; k < nv; k++)
                    more[u][k] =
                        _mm512_fmadd_ps(wu, INPUT512(k, su + 16 * k, j + 1 + u), more[u][k]);
            }
        }
        for (; j < j1; j++) {
            const __m512 w = _mm512_set1_ps(a->values[j]);
            const float *src = in + a->offsets[j];
            for (int k = 0; k < nv; k++)
                acc[k] = _mm512_fmadd_ps(w, INPUT512(k, src + 16 * k, j), acc[k]);
        }
        for (int u = 0; u < U - 1; u++)
            for (int k = 0; k < nv; k++) acc[k] = _mm512_add_ps(acc[k], more[u][k]);
        if (a->partial_out) {
            for (int k = 0; k < nv; k++) {
                if (k < nv - 1 || full) _mm512_storeu_ps(dst + 16 * k, acc[k]);
                else _mm512_mask_storeu_ps(dst + 16 * k, m[k], acc[k]);
            }
            continue;
        }
        const __m512 b = _mm512_set1_ps(a->bias ? a->bias[co] : 0.0f);
        const float *res = a->residual ? a->residual + co * a->ld_res + p0 : NULL;
        for (int k = 0; k < nv; k++) {
            __m512 v = _mm512_add_ps(acc[k], b);
            if (res) v = _mm512_add_ps(v, LOAD512(k, res + 16 * k));
            v = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);
            if ((k < nv - 1 || full) && a->stream && !((uintptr_t)(dst + 16 * k) & 63))
                _mm512_stream_ps(dst + 16 * k, v);
            else if (k < nv - 1 || full)
                _mm512_storeu_ps(dst + 16 * k, v);
            else
                _mm512_mask_storeu_ps(dst + 16 * k, m[k], v);
        }
    }
#undef TAP_MASK
#undef INPUT512
#undef LOAD512
}

/* One pixel (a Linear layer on one sample): a row's nonzeros 16 at a time, their inputs
 * gathered, where the tile loop would spend a masked vector on every nonzero. */
__attribute__((target("avx512f"))) static void
spmm_pixel_avx512(const spmm_args *a, int64_t c0, int64_t c1, int64_t p0) {
    const float *in = a->in + p0;
    for (int64_t co = c0; co < c1; co++) {
        const int32_t j1 = a->row_ptr[co + 1];
        int32_t j = a->row_ptr[co];
        __m512 s0 = _mm512_setzero_ps(), s1 = s0;
        float t[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (j1 - j < 64) {
            /* a short row: scalar loads into eight sums beat the gathers' start-up */
            for (; j + 8 <= j1; j += 8)
                for (int u = 0; u < 8; u++) t[u] += a->values[j + u] * in[a->offsets[j + u]];
            for (; j < j1; j++) t[0] += a->values[j] * in[a->offsets[j]];
        }
        for (; j + 32 <= j1; j += 32) {
            const __m512i i0 = _mm512_loadu_si512((const void *)(a->offsets + j));
            const __m512i i1 = _mm512_loadu_si512((const void *)(a->offsets + j + 16));
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a->values + j), _mm512_i32gather_ps(i0, in, 4),
                                 s0);
            s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a->values + j + 16),
                                 _mm512_i32gather_ps(i1, in, 4), s1);
        }
        for (; j < j1; j += 16) {
            const int32_t rem = j1 - j;
            const __mmask16 m = (__mmask16)(rem >= 16 ? 0xFFFF : ((1u << rem) - 1u));
            const __m512i idx = _mm512_maskz_loadu_epi32(m, a->offsets + j);
            const __m512 x = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, in, 4);
            s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a->values + j), x, s0);
        }
        float v = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) +
                  (((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7])));
        if (a->bias) v += a->bias[co];
        if (a->residual) v += a->residual[co * a->ld_res + p0];
        a->out[co * a->ld_out + p0] = clampf(v, a->lo, a->hi);
    }
}

__attribute__((target("avx512f"))) static void
spmm_tile_avx512(const spmm_args *a, int64_t c0, int64_t c1, int64_t p0, int64_t np) {
    if (np == 1 && !a->taps && !a->n_chunks) {
        spmm_pixel_avx512(a, c0, c1, p0);
        return;
    }
    const int nv = (int)((np + 15) / 16);
    const int rem = (int)(np - 16 * (nv - 1));
    const __mmask16 last = (__mmask16)(rem >= 16 ? 0xFFFF : ((1u << rem) - 1u));
    /* constant nv and full: each case compiles to straight-line code */
#define CASE512(n)                                                                         \
    case n:                                                                                \
        if (a->taps) spmm_tile_avx512_nv(a, c0, c1, p0, n, 0, last, 1);                    \
        else if (rem == 16) spmm_tile_avx512_nv(a, c0, c1, p0, n, 1, last, 0);             \
        else spmm_tile_avx512_nv(a, c0, c1, p0, n, 0, last, 0);                            \
        break;
    switch (nv) {
        CASE512(1) CASE512(2) CASE512(3) CASE512(4) CASE512(5) CASE512(6) CASE512(7)
        CASE512(8) CASE512(9) CASE512(10) CASE512(11) CASE512(12) CASE512(13) CASE512(14)
        CASE512(15)
    default:
        CASE512(16)
    }
#undef CASE512
}

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
spmm_tile_avx2_nv(const spmm_args *a, int64_t c0, int64_t c1, int64_t p0, const int nv,
                  const int full, __m256i last) {
    /* masked loads and stores only for the last vector of a partial tile (see above) */
    __m256i m[8];
    const __m256i all = _mm256_set1_epi32(-1);
    for (int k = 0; k < 8; k++) m[k] = k < nv - 1 ? all : last;
#define LOAD256(k, p) \
    ((k) < nv - 1 || full ? _mm256_loadu_ps(p) : _mm256_maskload_ps((p), m[(k)]))
    const __m256 vlo = _mm256_set1_ps(a->lo), vhi = _mm256_set1_ps(a->hi);
    /* independent sums as with AVX-512, within the 16 vector registers */
    const int U = nv <= 2 ? 4 : (nv <= 4 ? 2 : 1);
    for (int64_t co = c0; co < c1; co++) {
        __m256 acc[8], more[3][8];
        float *dst = a->out + co * a->ld_out + p0;
        for (int k = 0; k < nv; k++)
            acc[k] = a->partial_in ? LOAD256(k, dst + 8 * k) : _mm256_setzero_ps();
        for (int u = 0; u < U - 1; u++)
            for (int k = 0; k < nv; k++) more[u][k] = _mm256_setzero_ps();
        const int32_t j1 = a->row_ptr[co + 1];
        int32_t j = a->row_ptr[co];
        const float *in = a->in + p0;
        for (; j + U <= j1; j += U) {
            const __m256 w = _mm256_set1_ps(a->values[j]);
            const float *src = in + a->offsets[j];
            for (int k = 0; k < nv; k++)
                acc[k] = _mm256_fmadd_ps(w, LOAD256(k, src + 8 * k), acc[k]);
            for (int u = 0; u < U - 1; u++) {
                const __m256 wu = _mm256_set1_ps(a->values[j + 1 + u]);
                const float *su = in + a->offsets[j + 1 + u];
                for (int k = 0; k < nv; k++)
                    more[u][k] = _mm256_fmadd_ps(wu, LOAD256(k, su + 8 * k), more[u][k]);
            }
        }
        for (; j < j1; j++) {
            const __m256 w = _mm256_set1_ps(a->values[j]);
            const float *src = in + a->offsets[j];
            for (int k = 0; k < nv; k++)
                acc[k] = _mm256_fmadd_ps(w, LOAD256(k, src + 8 * k), acc[k]);
        }
        for (int u = 0; u < U - 1; u++)
            for (int k = 0; k < nv; k++) acc[k] = _mm256_add_ps(acc[k], more[u][k]);
        if (a->partial_out) {
            for (int k = 0; k < nv; k++) {
                if (k < nv - 1 || full) _mm256_storeu_ps(dst + 8 * k, acc[k]);
                else _mm256_maskstore_ps(dst + 8 * k, m[k], acc[k]);
            }
            continue;
        }
        const __m256 b = _mm256_set1_ps(a->bias ? a->bias[co] : 0.0f);
        const float *res = a->residual ? a->residual + co * a->ld_res + p0 : NULL;
        for (int k = 0; k < nv; k++) {
            __m256 v = _mm256_add_ps(acc[k], b);
            if (res) v = _mm256_add_ps(v, LOAD256(k, res + 8 * k));
            v = _mm256_min_ps(_mm256_max_ps(v, vlo), vhi);
            if (k < nv - 1 || full)
                _mm256_storeu_ps(dst + 8 * k, v);
            else
                _mm256_maskstore_ps(dst + 8 * k, m[k], v);
        }
    }
}

/* One pixel: the rows' inputs gathered, as with AVX-512. */
__attribute__((target("avx2,fma"))) static void
spmm_pixel_avx2(const spmm_args *a, int64_t c0, int64_t c1, int64_t p0) {
    const float *in = a->in + p0;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t co = c0; co < c1; co++) {
        const int32_t j1 = a->row_ptr[co + 1];
        int32_t j = a->row_ptr[co];
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
        for (; j + 16 <= j1; j += 16) {
            const __m256i i0 = _mm256_loadu_si256((const __m256i *)(a->offsets + j));
            const __m256i i1 = _mm256_loadu_si256((const __m256i *)(a->offsets + j + 8));
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a->values + j), _mm256_i32gather_ps(in, i0, 4),
                                 s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a->values + j + 8),
                                 _mm256_i32gather_ps(in, i1, 4), s1);
        }
        for (; j < j1; j += 8) {
            const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(j1 - j), lane);
            const __m256i idx = _mm256_maskload_epi32(a->offsets + j, m);
            const __m256 x =
                _mm256_mask_i32gather_ps(_mm256_setzero_ps(), in, idx, _mm256_castsi256_ps(m), 4);
            s0 = _mm256_fmadd_ps(_mm256_maskload_ps(a->values + j, m), x, s0);
        }
        const __m256 s = _mm256_add_ps(s0, s1);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        float v = _mm_cvtss_f32(h);
        if (a->bias) v += a->bias[co];
        if (a->residual) v += a->residual[co * a->ld_res + p0];
        a->out[co * a->ld_out + p0] = clampf(v, a->lo, a->hi);
    }
}

__attribute__((target("avx2,fma"))) static void
spmm_tile_avx2(const spmm_args *a, int64_t c0, int64_t c1, int64_t p0, int64_t np) {
    if (np == 1 && !a->n_chunks) {
        spmm_pixel_avx2(a, c0, c1, p0);
        return;
    }
    const int nv = (int)((np + 7) / 8);
    const int rem = (int)(np - 8 * (nv - 1));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i last = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), lane);
#define CASE256(n)                                                                         \
    case n:                                                                                \
        if (rem == 8) spmm_tile_avx2_nv(a, c0, c1, p0, n, 1, last);                        \
        else spmm_tile_avx2_nv(a, c0, c1, p0, n, 0, last);                                 \
        break;
    switch (nv) {
        CASE256(1) CASE256(2) CASE256(3) CASE256(4) CASE256(5) CASE256(6) CASE256(7)
    default:
        CASE256(8)
    }
#undef CASE256
}
#endif

typedef void (*tile_fn)(const spmm_args *, int64_t, int64_t, int64_t, int64_t);

static int isa_selected = -1;

static int isa_supported(int isa) {
    if (isa == ISA_PORTABLE) return 1;
#if SS_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == ISA_AVX512) return __builtin_cpu_supports("avx512f");
#endif
    return 0;
}

static int isa_best(void) {
    if (isa_supported(ISA_AVX512)) return ISA_AVX512;
    if (isa_supported(ISA_AVX2)) return ISA_AVX2;
    return ISA_PORTABLE;
}

/* The instruction set in use: 0 portable, 1 AVX2, 2 AVX-512. */
SS_EXPORT int ss_isa(void) {
    if (isa_selected < 0) isa_selected = isa_best();
    return isa_selected;
}

/* Select an instruction set (-1: the best this CPU supports); returns the one in use, or -1
 * if the CPU lacks the one asked for (the selection is then unchanged). */
SS_EXPORT int ss_set_isa(int isa) {
    if (isa < 0) {
        isa_selected = isa_best();
        return isa_selected;
    }
    if (isa > ISA_AVX512 || !isa_supported(isa)) return -1;
    isa_selected = isa;
    return isa_selected;
}

typedef void (*row_copy_fn)(float *dst, const float *src, int64_t count);

/* The window buffer of a task (NULL without windows, or if it cannot be had: the tiles are
 * then computed from the input as usual), local's offsets aimed at it. */
static float *windows_alloc(const spmm_args *a, spmm_args *local) {
    if (!a->windows) return NULL;
    const size_t bytes = (size_t)(a->n_windows * a->tile) * sizeof(float);
    float *buf = (float *)aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (buf) local->offsets = a->window_offsets;
    return buf;
}

/* Each distinct window of tile [p0, p0 + np) copied once into buf, aligned (the product's
 * loads then touch one cache line each instead of two), local's input aimed at it. */
static inline __attribute__((always_inline)) void
windows_fill(const spmm_args *a, spmm_args *local, float *buf, int64_t p0, int64_t np,
             row_copy_fn copy) {
    for (int64_t d = 0; d < a->n_windows; d++)
        copy(buf + d * a->tile, a->in + a->windows[d] + p0, np);
    local->in = (const float *)((uintptr_t)buf - (uintptr_t)(p0 * 4));
}

static void spmm_task(void *ctx, int64_t begin, int64_t end);

/* ------------------------------------------------------------------------------------------ */
/* Mapped outputs. The kernel's pixel p stands for (n, i, j) of a grid with rows of src_w
 * pixels and src_h rows an image; only i < valid_h, j < valid_w are real pixels (a
 * shifted-window output has junk columns and rows). A mapped product writes each real pixel
 * straight to where the next layer reads it: the compact (C, N, valid_h, valid_w) output, or
 * the zero-padded parity planes a k x k conv reads (see ss_pad_planes), so that no separate
 * pass drops the junk or pads. A tile is computed for a few channels at a time into a small
 * buffer that stays in L1, then its row segments are copied out.                             */

enum { MAP_SRC_H, MAP_SRC_W, MAP_VALID_H, MAP_VALID_W, MAP_STRIDE, MAP_PAD_T, MAP_PAD_L,
       MAP_HQ, MAP_WQ, MAP_PLANE, MAP_LEN };

#define SS_MAP_CHANNELS 16
#define SS_MAX_MAP_STRIDE 4

typedef struct {
    int64_t src, dst, res, count; /* tile offset, offset in a channel of out and residual */
} row_segment;

/* The row segments of tile [p0, p0 + np): at most np * stride of them. */
static int64_t map_segments(const int64_t *map, int64_t p0, int64_t np, row_segment *seg) {
    const int64_t src_w = map[MAP_SRC_W], src_h = map[MAP_SRC_H];
    const int64_t vh = map[MAP_VALID_H], vw = map[MAP_VALID_W], s = map[MAP_STRIDE];
    const int64_t hq = map[MAP_HQ], wq = map[MAP_WQ], plane = map[MAP_PLANE];
    int64_t count = 0;
    for (int64_t p = p0, end = p0 + np; p < end;) {
        const int64_t row = p / src_w, j = p - row * src_w;
        const int64_t row_end = (row + 1) * src_w < end ? (row + 1) * src_w : end;
        const int64_t n = row / src_h, i = row - n * src_h;
        int64_t j_end = j + (row_end - p);
        if (j_end > vw) j_end = vw;
        if (i < vh && j < j_end) {
            const int64_t y = i + map[MAP_PAD_T];
            const int64_t row_dst = (y % s) * s * plane + (n * hq + y / s) * wq;
            const int64_t row_res = (n * vh + i) * vw;
            /* stride s: every s-th column goes to the same parity plane */
            for (int64_t jj = j; jj < j + s && jj < j_end; jj++) {
                const int64_t x = jj + map[MAP_PAD_L];
                seg[count].src = p - p0 + (jj - j);
                seg[count].dst = row_dst + (x % s) * plane + x / s;
                seg[count].res = row_res + jj;
                seg[count].count = (j_end - jj + s - 1) / s;
                count++;
            }
        }
        p = row_end;
    }
    return count;
}

/* dst[j] = src[stride * j] for j < count; src holds `avail` readable floats. */
typedef void (*strided_fn)(float *dst, const float *src, int64_t count, int64_t stride,
                           int64_t avail);

static inline __attribute__((always_inline)) void row_copy_portable(float *dst, const float *src,
                                                                     int64_t count) {
    for (int64_t q = 0; q < count; q++) dst[q] = src[q];
}

#if SS_X86
/* full vectors, the last one overlapping the one before it (no masked stores, which some
 * CPUs run slowly) */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
row_copy_avx512(float *dst, const float *src, int64_t count) {
    if (count < 16) {
        const __mmask16 m = (__mmask16)((1u << count) - 1u);
        _mm512_mask_storeu_ps(dst, m, _mm512_maskz_loadu_ps(m, src));
        return;
    }
    int64_t q = 0;
    for (; q + 16 <= count; q += 16) _mm512_storeu_ps(dst + q, _mm512_loadu_ps(src + q));
    if (q < count) _mm512_storeu_ps(dst + count - 16, _mm512_loadu_ps(src + count - 16));
}

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
row_copy_avx2(float *dst, const float *src, int64_t count) {
    if (count < 8) {
        for (int64_t q = 0; q < count; q++) dst[q] = src[q];
        return;
    }
    int64_t q = 0;
    for (; q + 8 <= count; q += 8) _mm256_storeu_ps(dst + q, _mm256_loadu_ps(src + q));
    if (q < count) _mm256_storeu_ps(dst + count - 8, _mm256_loadu_ps(src + count - 8));
}
#endif

/* The mapped product's task; inlined into each instruction set's own copy with that set's
 * tile function and row copies. */
static inline __attribute__((always_inline)) void
spmm_mapped_body(const spmm_args *a, int64_t begin, int64_t end, tile_fn fn, row_copy_fn copy,
                 strided_fn strided) {
    const int64_t s = a->map[MAP_STRIDE];
    /* the tile is computed without the residual, which is added in the copy-out */
    spmm_args local = *a;
    local.residual = NULL;
    if (a->residual) {
        local.lo = -INFINITY;
        local.hi = INFINITY;
    }
    local.ld_out = a->tile;
    float buf[SS_MAP_CHANNELS * SS_MAX_TILE];
    row_segment seg[SS_MAX_TILE * SS_MAX_MAP_STRIDE];
    float *windows = windows_alloc(a, &local);
    uint16_t mask[SS_MAX_TAPS * SS_MASK_ROW];
    local.tile_mask = mask;
    for (int64_t item = begin; item < end; item++) {
        const int64_t t = item / a->n_blocks, blk = item % a->n_blocks;
        const int64_t p0 = t * a->tile;
        const int64_t np = a->n_pix - p0 < a->tile ? a->n_pix - p0 : a->tile;
        const int64_t n_seg = map_segments(a->map, p0, np, seg);
        if (windows) windows_fill(a, &local, windows, p0, np, copy);
        if (a->taps) shifted_masks(a, p0, np, mask);
        const int64_t c_end = a->block_start[blk + 1];
        for (int64_t c0 = a->block_start[blk]; c0 < c_end; c0 += SS_MAP_CHANNELS) {
            const int64_t c1 = c0 + SS_MAP_CHANNELS < c_end ? c0 + SS_MAP_CHANNELS : c_end;
            /* the tile function writes out[co*ld_out + p]: aim it at buf (integer arithmetic:
             * the pointer itself may lie outside buf) */
            local.out = (float *)((uintptr_t)buf - (uintptr_t)((c0 * a->tile + p0) * 4));
            fn(&local, c0, c1, p0, np);
            /* segment by segment, each for all the channels: the copies of one segment have
             * the same length, so their branches are predicted (1.03x on ResNet-50) */
            for (int64_t k = 0; k < n_seg; k++) {
                const row_segment g = seg[k];
                float *out = a->out + c0 * a->ld_out + g.dst;
                const float *tile = buf + g.src;
                if (a->residual) {
                    const float *res = a->residual + c0 * a->ld_res + g.res;
                    for (int64_t co = c0; co < c1;
                         co++, out += a->ld_out, tile += a->tile, res += a->ld_res)
                        for (int64_t q = 0; q < g.count; q++)
                            out[q] = clampf(tile[s * q] + res[s * q], a->lo, a->hi);
                } else if (s == 1) {
                    for (int64_t co = c0; co < c1; co++, out += a->ld_out, tile += a->tile)
                        copy(out, tile, g.count);
                } else {
                    for (int64_t co = c0; co < c1; co++, out += a->ld_out, tile += a->tile)
                        strided(out, tile, g.count, s, np - g.src);
                }
            }
        }
    }
    free(windows);
}

static void strided_copy_portable(float *dst, const float *src, int64_t count, int64_t stride,
                                  int64_t avail);
#if SS_X86
static void strided_copy_avx512(float *dst, const float *src, int64_t count, int64_t stride,
                                int64_t avail);
static void strided_copy_avx2(float *dst, const float *src, int64_t count, int64_t stride,
                              int64_t avail);

__attribute__((target("avx512f"))) static void spmm_mapped_task_avx512(void *ctx, int64_t begin,
                                                                         int64_t end) {
    spmm_mapped_body((const spmm_args *)ctx, begin, end, spmm_tile_avx512, row_copy_avx512,
                     strided_copy_avx512);
}

__attribute__((target("avx2,fma"))) static void spmm_mapped_task_avx2(void *ctx, int64_t begin,
                                                                       int64_t end) {
    spmm_mapped_body((const spmm_args *)ctx, begin, end, spmm_tile_avx2, row_copy_avx2,
                     strided_copy_avx2);
}
#endif

static void spmm_mapped_task_portable(void *ctx, int64_t begin, int64_t end) {
    spmm_mapped_body((const spmm_args *)ctx, begin, end, spmm_tile_portable, row_copy_portable,
                     strided_copy_portable);
}

static void spmm_task(void *ctx, int64_t begin, int64_t end) {
    const spmm_args *a = (const spmm_args *)ctx;
    tile_fn fn = spmm_tile_portable;
    row_copy_fn copy = row_copy_portable;
#if SS_X86
    int isa = ss_isa();
    if (isa == ISA_AVX512) {
        fn = spmm_tile_avx512;
        copy = row_copy_avx512;
    } else if (isa == ISA_AVX2) {
        fn = spmm_tile_avx2;
        copy = row_copy_avx2;
    }
    /* a shifted product masks its loads with AVX-512, or checks each pixel */
    if (a->taps && fn != spmm_tile_avx512) fn = spmm_tile_portable;
#else
    if (a->taps) fn = spmm_tile_portable;
#endif
    spmm_args local = *a;
    float *windows = windows_alloc(a, &local);
    uint16_t mask[SS_MAX_TAPS * SS_MASK_ROW];
    local.tile_mask = mask;
    for (int64_t item = begin; item < end; item++) {
        const int64_t t = item / a->n_blocks, blk = item % a->n_blocks;
        const int64_t p0 = t * a->tile;
        const int64_t np = a->n_pix - p0 < a->tile ? a->n_pix - p0 : a->tile;
        if (windows) windows_fill(a, &local, windows, p0, np, copy);
        if (a->taps) shifted_masks(a, p0, np, mask);
        const int64_t c0 = a->block_start[blk], c1 = a->block_start[blk + 1];
        if (a->n_chunks) { /* run by run: each run's inputs for the tile stay in cache */
            for (int64_t c = 0; c < a->n_chunks; c++) {
                local.row_ptr = a->row_ptr + c * (a->c_out + 1);
                local.partial_in = c > 0;
                local.partial_out = c < a->n_chunks - 1;
                local.stream = a->stream && !local.partial_out;
                fn(&local, c0, c1, p0, np);
            }
            continue;
        }
        if (!a->ahead || p0 + a->tile >= a->n_pix) {
            fn(&local, c0, c1, p0, np);
            continue;
        }
        /* the next tile's input lines, prefetched a few at a time between blocks of channels */
        const int64_t lines = (a->tile * 4 + 63) / 64, total = a->n_ahead * lines;
        const int64_t chunks = (c1 - c0 + SS_AHEAD_CHANNELS - 1) / SS_AHEAD_CHANNELS;
        const int64_t per = (total + chunks - 1) / chunks;
        const float *next = a->in + p0 + a->tile + a->ahead_reach;
        int64_t e = 0;
        for (int64_t c = c0; c < c1; c += SS_AHEAD_CHANNELS) {
            fn(&local, c, c + SS_AHEAD_CHANNELS < c1 ? c + SS_AHEAD_CHANNELS : c1, p0, np);
            for (const int64_t stop = e + per < total ? e + per : total; e < stop; e++)
                __builtin_prefetch(next + a->ahead[e / lines] + 16 * (e % lines), 0, 3);
        }
    }
#if SS_X86
    if (a->stream) _mm_sfence(); /* the stores seen before the task is done */
#endif
    free(windows);
}

static task_fn spmm_mapped_task(void) {
#if SS_X86
    switch (ss_isa()) {
    case ISA_AVX512: return spmm_mapped_task_avx512;
    case ISA_AVX2: return spmm_mapped_task_avx2;
    default: break;
    }
#endif
    return spmm_mapped_task_portable;
}

static int64_t tile_size(void) {
    switch (ss_isa()) {
    case ISA_AVX512: return 128;
    case ISA_AVX2: return 64;
    default: return 32;
    }
}

/* Copying each distinct window into an aligned buffer (ss_spmm_windows): -1 where it pays,
 * 0 never, 1 always. It paid where windows that are not all aligned are each read by many
 * nonzeros (1 thread, interleaved in one process): on ResNet-50's 7x7 stride-2 stem (147
 * windows, each read by about 21 nonzeros; the buffer within the L1 cache) the product ran
 * 1.12x faster with AVX-512 and 1.08x with AVX2, and on the 1x1 convs of its 7x7 stage (49
 * pixels a channel, each read by 30 to 212 nonzeros; the buffer within L2) 1.15-1.26x. Where
 * fewer nonzeros read each window, the copy cost more than it saved (0.68-0.85x on 3x3 convs
 * whose windows overflow L1), and the portable code gained nothing. */
static int window_mode = -1;

#define SS_WINDOW_L1 (40 * 1024)
#define SS_WINDOW_L1_REUSE 8 /* nonzeros per window, at least, with the buffer in L1 */
#define SS_WINDOW_L2 (512 * 1024)
#define SS_WINDOW_L2_REUSE 16 /* nonzeros per window, at least, with the buffer in L2 */

/* Tiles of at most `widest` pixels of about the same width, a multiple of 16 (so that every
 * window in the buffer stays aligned). */
static int64_t window_tile(int64_t n_pix, int64_t widest) {
    const int64_t n_tiles = (n_pix + widest - 1) / widest;
    return ((n_pix + n_tiles - 1) / n_tiles + 15) / 16 * 16;
}

/* Whole windows copied into a buffer with rows of ld floats (see spmm_run). */
typedef struct {
    const float *in;
    const int32_t *windows;
    float *out;
    int64_t ld, n_pix;
} window_copy_args;

static void window_copy_task(void *ctx, int64_t begin, int64_t end) {
    const window_copy_args *c = (const window_copy_args *)ctx;
    for (int64_t d = begin; d < end; d++)
        memcpy(c->out + d * c->ld, c->in + c->windows[d], sizeof(float) * (size_t)c->n_pix);
}

/* The window buffer's tile width, or 0 where the copy does not pay. */
static int64_t window_width(const float *in, const int32_t *windows, int64_t n_windows,
                            int64_t nnz, int64_t n_pix, int64_t tile) {
    const int64_t narrow = window_tile(n_pix, tile < 64 ? tile : 64);
    if (window_mode >= 0) return window_mode ? narrow : 0;
    if (ss_isa() == ISA_PORTABLE) return 0;
    int aligned = 1; /* a copy of aligned windows gains nothing */
    for (int64_t d = 0; d < n_windows && aligned; d++)
        aligned = (uintptr_t)(in + windows[d]) % 64 == 0;
    if (aligned) return 0;
    const int64_t wide = window_tile(n_pix, tile), bytes = n_windows * (int64_t)sizeof(float);
    if (nnz >= SS_WINDOW_L1_REUSE * n_windows && narrow * bytes <= SS_WINDOW_L1) return narrow;
    if (nnz >= SS_WINDOW_L2_REUSE * n_windows && wide * bytes <= SS_WINDOW_L2) return wide;
    return 0;
}

/* How products over large tensors are run (see large_mode); returns the mode. */
SS_EXPORT int ss_set_large(int mode) {
    large_mode = mode < 0 ? -1 : (mode > 0 ? 1 : 0);
    return large_mode;
}

/* Set the window copy's mode (-1 where it pays, 0 never, 1 always); returns the mode. */
SS_EXPORT int ss_set_window_copy(int mode) {
    window_mode = mode < 0 ? -1 : (mode > 0 ? 1 : 0);
    return window_mode;
}

/* A product's context as a job that returns early keeps it (spmm_args first: the task reads
 * the copy as its spmm_args). */
typedef struct {
    spmm_args a;
    int64_t block_start[257];
} spmm_early;
_Static_assert(sizeof(spmm_early) <= SS_EARLY_CTX, "early_ctx is too small");

static void spmm_early_fixup(void *copy) {
    spmm_early *job = (spmm_early *)copy;
    job->a.block_start = job->block_start;
}

static void spmm_run(const float *in, float *out, const float *values, const int32_t *offsets,
                     const int32_t *row_ptr, const float *bias, const float *residual,
                     int64_t c_out, int64_t n_pix, int64_t ld_out, int64_t ld_res, float lo,
                     float hi, int threads, const int64_t *map, const int32_t *windows,
                     const int32_t *slots, int64_t n_windows, const int32_t *taps,
                     const int32_t *shifts, int64_t n_taps, int64_t img_h, int64_t img_w,
                     int64_t n_chunks) {
    if (c_out <= 0 || n_pix <= 0) return;
    /* negative threads: may return before the work is done (see early_ctx) */
    const int early = threads < 0;
    if (early) threads = -threads;
    threads = allowed_threads(threads);
    /* the last run's end: every nonzero, runs or not */
    const int32_t nz_end = row_ptr[(n_chunks > 1 ? n_chunks : 1) * (c_out + 1) - 1];
    if ((int64_t)(nz_end - row_ptr[0]) * n_pix < SS_SERIAL_MACS) threads = 1;
    spmm_args a = {in, out, values, offsets, row_ptr, bias, residual, c_out, n_pix,
                   ld_out, ld_res, lo, hi, 0, 0, 0, NULL, map, NULL, NULL, 0, NULL, NULL, 0,
                   0, 0, NULL, 0, NULL, 0, 0, 0, 0, 0};
    a.tile = tile_size();
    a.n_chunks = n_chunks > 1 ? n_chunks : 0;
    a.stream = !map && ss_isa() == ISA_AVX512 &&
               (large_mode < 0 ? (int64_t)sizeof(float) * c_out * ld_out >= SS_LARGE_BYTES
                               : large_mode);
    if (map && a.tile > SS_MAX_TILE) a.tile = SS_MAX_TILE;
    if (taps) {
        a.taps = taps;
        a.shifts = shifts;
        a.n_taps = n_taps;
        a.img_h = img_h;
        a.img_w = img_w;
        if (ss_isa() != ISA_AVX512) a.tile = 32; /* the portable tile (see spmm_task) */
        else if (!map) a.tile = SS_WIDE_TILE;
    }
    int32_t *window_offsets = NULL;
    const int64_t wt = windows && n_windows > 0 ? window_width(in, windows, n_windows,
                                                              row_ptr[c_out] - row_ptr[0],
                                                              n_pix, a.tile)
                                                : 0;
    float *shared = NULL;
    if (wt > 0) {
        /* where nonzero j reads in the window buffer */
        window_offsets = (int32_t *)malloc(sizeof(int32_t) * (size_t)(row_ptr[c_out] + 1));
        /* On several threads with fewer tiles than the items they want, the work is split
         * over blocks of output channels, and each block would copy every window of its tile
         * again: then each window is copied once, whole, on all the threads, into one aligned
         * buffer that they all read (ResNet-50's 14x14 and 7x7 stages at batch 1). */
        const int64_t ld = (n_pix + 15) / 16 * 16;
        const size_t shared_bytes = sizeof(float) * (size_t)(n_windows * ld);
        if (window_offsets && threads > 1 && (n_pix + wt - 1) / wt < 4 * (int64_t)threads &&
            shared_bytes <= SS_WINDOW_L2)
            shared = (float *)aligned_alloc(64, shared_bytes);
        if (shared) {
            window_copy_args c = {in, windows, shared, ld, n_pix};
            parallel_for(threads, n_windows, window_copy_task, &c);
            for (int32_t j = row_ptr[0]; j < row_ptr[c_out]; j++)
                window_offsets[j] = slots[j] * (int32_t)ld;
            a.in = shared;
            a.offsets = window_offsets;
        } else if (window_offsets) {
            for (int32_t j = row_ptr[0]; j < row_ptr[c_out]; j++)
                window_offsets[j] = slots[j] * (int32_t)wt;
            a.tile = wt;
            a.windows = windows;
            a.window_offsets = window_offsets;
            a.n_windows = n_windows;
        }
    }
    a.n_tiles = (n_pix + a.tile - 1) / a.tile;
    int64_t *ahead = NULL;
    if (large_mode != 0 && !early && !map && !a.windows && !shared && (windows || taps)) {
        /* the inputs' starts: the distinct windows, or a shifted product's channels (each
         * offset lies within half a channel of its channel's start, or the prefetch misses) */
        int64_t top = 0; /* the farthest offset: among the few distinct windows, if known */
        if (windows) {
            for (int64_t k = 0; k < n_windows; k++)
                if (windows[k] > top) top = windows[k];
        } else {
            for (int32_t j = row_ptr[0]; j < row_ptr[c_out]; j++)
                if (offsets[j] > top) top = offsets[j];
        }
        const int64_t n_max = taps ? top / n_pix + 2 : n_windows;
        const int64_t bytes = (int64_t)sizeof(float) * (taps ? n_max * n_pix : top + n_pix);
        if (large_mode > 0 || bytes >= SS_LARGE_BYTES)
            ahead = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n_max > 0 ? n_max : 1));
        unsigned char *seen = ahead && taps ? (unsigned char *)calloc((size_t)n_max, 1) : NULL;
        if (ahead && windows) {
            for (int64_t k = 0; k < n_windows; k++) ahead[k] = windows[k];
            a.n_ahead = n_windows;
        } else if (seen) {
            for (int64_t t = 0; t < n_taps; t++) {
                const int64_t d = shifts[2 * t] * img_w + shifts[2 * t + 1];
                if (d > a.ahead_reach) a.ahead_reach = d;
            }
            for (int32_t j = row_ptr[0]; j < row_ptr[c_out]; j++) {
                const int64_t ci = (offsets[j] + n_pix / 2) / n_pix;
                if (ci >= 0 && ci < n_max && !seen[ci]) {
                    seen[ci] = 1;
                    ahead[a.n_ahead++] = ci * n_pix;
                }
            }
        }
        free(seen);
        if (a.n_ahead > 0 && (int64_t)sizeof(float) * a.n_ahead * a.tile <= SS_AHEAD_TILE_BYTES)
            a.ahead = ahead;
    }
    /* enough (tile, channel block) items for every thread to get a few */
    int64_t blocks = 1;
    if (threads > 1) {
        const int64_t want = 4 * (int64_t)threads;
        blocks = a.n_tiles >= want ? 1 : (want + a.n_tiles - 1) / a.n_tiles;
        if (blocks > c_out) blocks = c_out;
        if (blocks > 256) blocks = 256;
    }
    int64_t block_start[257];
    /* blocks of output channels with about the same number of nonzeros */
    const int64_t nnz = row_ptr[c_out] - row_ptr[0]; /* the first run's, with runs */
    block_start[0] = 0;
    int64_t co = 0;
    for (int64_t b = 1; b < blocks; b++) {
        const int64_t target = row_ptr[0] + nnz * b / blocks;
        while (co < c_out && row_ptr[co] < target) co++;
        if (co < block_start[b - 1] + 1) co = block_start[b - 1] + 1;
        if (co > c_out) co = c_out;
        block_start[b] = co;
    }
    block_start[blocks] = c_out;
    a.n_blocks = blocks;
    a.block_start = block_start;
    task_fn task = map ? spmm_mapped_task() : spmm_task;
    if (map && taps && ss_isa() != ISA_AVX512) task = spmm_mapped_task_portable;
    const int small = nnz * n_pix < SS_FAR_MACS; /* may run alone while the threads are far */
    if (early && !window_offsets) {
        spmm_early job = {a, {0}};
        memcpy(job.block_start, block_start, sizeof(int64_t) * (size_t)(blocks + 1));
        parallel_run(threads, a.n_tiles * blocks, task, &job, sizeof job, spmm_early_fixup,
                     small);
        return;
    }
    parallel_run(threads, a.n_tiles * blocks, task, &a, 0, NULL, small);
    free(ahead);
    free(window_offsets);
    free(shared);
}

/* out[co*ld_out + p] = clamp(bias[co] + sum_j values[j]*in[offsets[j] + p]
 *                            (+ residual[co*ld_res + p]), lo, hi), p in [0, n_pix). */
SS_EXPORT void ss_spmm(const float *in, float *out, const float *values, const int32_t *offsets,
                       const int32_t *row_ptr, const float *bias, const float *residual,
                       int64_t c_out, int64_t n_pix, int64_t ld_out, int64_t ld_res, float lo,
                       float hi, int threads) {
    RECORD(OP_SPMM, RP(in), RP(out), RP(values), RP(offsets), RP(row_ptr), RP(bias),
           RP(residual), c_out, n_pix, ld_out, ld_res, float_bits(lo), float_bits(hi), threads);
    spmm_run(in, out, values, offsets, row_ptr, bias, residual, c_out, n_pix, ld_out, ld_res,
             lo, hi, threads, NULL, NULL, NULL, 0, NULL, NULL, 0, 0, 0, 0);
}

/* ss_spmm with the nonzeros in n_chunks runs by input column (each run ordered by output
 * channel, as CSR): row_ptr holds n_chunks row pointers of c_out + 1 entries each, absolute
 * indices into values and offsets. Each tile is computed run by run, so that one run's inputs
 * for it stay in cache where all of them would not: a Linear layer of 3072 inputs on 1,024
 * tokens reads 1.5 MB a 128-token tile. */
SS_EXPORT void ss_spmm_chunked(const float *in, float *out, const float *values,
                               const int32_t *offsets, const int32_t *row_ptr, const float *bias,
                               const float *residual, int64_t c_out, int64_t n_pix,
                               int64_t ld_out, int64_t ld_res, float lo, float hi, int threads,
                               int64_t n_chunks) {
    RECORD(OP_SPMM_CHUNKED, RP(in), RP(out), RP(values), RP(offsets), RP(row_ptr), RP(bias),
           RP(residual), c_out, n_pix, ld_out, ld_res, float_bits(lo), float_bits(hi), threads,
           n_chunks);
    spmm_run(in, out, values, offsets, row_ptr, bias, residual, c_out, n_pix, ld_out, ld_res,
             lo, hi, threads, NULL, NULL, NULL, 0, NULL, NULL, 0, 0, 0, n_chunks);
}

/* Whether the output map's stride and grid are ones the mapped product can follow. */
static int map_ok(const int64_t *map) {
    return map[MAP_STRIDE] >= 1 && map[MAP_STRIDE] <= SS_MAX_MAP_STRIDE && map[MAP_SRC_W] >= 1 &&
           map[MAP_SRC_H] >= 1;
}

/* The product of ss_spmm with its pixels mapped (map: MAP_LEN int64 values, see the MAP_
 * enum): pixel p = (n*src_h + i)*src_w + j with i < valid_h and j < valid_w goes to
 * out[co*ld_out + (y%stride*stride + x%stride)*plane + (n*hq + y/stride)*wq + x/stride],
 * y = i + pad_t, x = j + pad_l, the other pixels nowhere; the residual is read at
 * residual[co*ld_res + (n*valid_h + i)*valid_w + j]. */
SS_EXPORT int ss_spmm_mapped(const float *in, float *out, const float *values,
                             const int32_t *offsets, const int32_t *row_ptr, const float *bias,
                             const float *residual, int64_t c_out, int64_t n_pix, int64_t ld_out,
                             int64_t ld_res, float lo, float hi, int threads,
                             const int64_t *map) {
    /* returns -1, computing nothing, for a stride or a grid it cannot map */
    if (!map_ok(map)) return -1;
    RECORD(OP_SPMM_MAPPED, RP(in), RP(out), RP(values), RP(offsets), RP(row_ptr), RP(bias),
           RP(residual), c_out, n_pix, ld_out, ld_res, float_bits(lo), float_bits(hi), threads,
           RP(map));
    spmm_run(in, out, values, offsets, row_ptr, bias, residual, c_out, n_pix, ld_out, ld_res,
             lo, hi, threads, map, NULL, NULL, 0, NULL, NULL, 0, 0, 0, 0);
    return 0;
}

/* ss_spmm (map NULL) or ss_spmm_mapped, given the distinct values of `offsets`
 * (windows[n_windows]) and, per nonzero, which of them it is (offsets[j] ==
 * windows[slots[j]]): where a window is reused by many nonzeros, each is copied once per tile
 * into an aligned buffer that the product reads (see window_width). */
SS_EXPORT int ss_spmm_windows(const float *in, float *out, const float *values,
                              const int32_t *offsets, const int32_t *row_ptr, const float *bias,
                              const float *residual, int64_t c_out, int64_t n_pix,
                              int64_t ld_out, int64_t ld_res, float lo, float hi, int threads,
                              const int64_t *map, const int32_t *windows, const int32_t *slots,
                              int64_t n_windows) {
    if (map && !map_ok(map)) return -1;
    RECORD(OP_SPMM_WINDOWS, RP(in), RP(out), RP(values), RP(offsets), RP(row_ptr), RP(bias),
           RP(residual), c_out, n_pix, ld_out, ld_res, float_bits(lo), float_bits(hi), threads,
           RP(map), RP(windows), RP(slots), n_windows);
    spmm_run(in, out, values, offsets, row_ptr, bias, residual, c_out, n_pix, ld_out, ld_res,
             lo, hi, threads, map, windows, slots, n_windows, NULL, NULL, 0, 0, 0, 0);
    return 0;
}

/* A stride-1 conv whose output grid is its input's, read straight from the channel-major
 * input (C, N, h, w) with no padding: as ss_spmm or ss_spmm_mapped (map NULL or not), where
 * nonzero j reads in[offsets[j] + p] only at the output pixels p = (n*h + y)*w + x whose tap
 * (dy, dx) = (shifts[2*taps[j]], shifts[2*taps[j] + 1]) lands inside the image
 * (0 <= y + dy < h, 0 <= x + dx < w) and reads zero elsewhere; offsets[j] is the input
 * channel's start + dy*w + dx. Returns -1, computing nothing, for more than SS_MAX_TAPS taps or
 * a map it cannot follow. */
SS_EXPORT int ss_spmm_shifted(const float *in, float *out, const float *values,
                              const int32_t *offsets, const int32_t *row_ptr, const float *bias,
                              const float *residual, int64_t c_out, int64_t n_pix,
                              int64_t ld_out, int64_t ld_res, float lo, float hi, int threads,
                              const int64_t *map, const int32_t *taps, const int32_t *shifts,
                              int64_t n_taps, int64_t h, int64_t w) {
    if (n_taps < 1 || n_taps > SS_MAX_TAPS || h < 1 || w < 1) return -1;
    if (map && !map_ok(map)) return -1;
    RECORD(OP_SPMM_SHIFTED, RP(in), RP(out), RP(values), RP(offsets), RP(row_ptr), RP(bias),
           RP(residual), c_out, n_pix, ld_out, ld_res, float_bits(lo), float_bits(hi), threads,
           RP(map), RP(taps), RP(shifts), n_taps, h, w);
    spmm_run(in, out, values, offsets, row_ptr, bias, residual, c_out, n_pix, ld_out, ld_res,
             lo, hi, threads, map, NULL, NULL, 0, taps, shifts, n_taps, h, w, 0);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Layout preparation.                                                                         */

/* Zeroing a buffer (the next conv's planes, whose padding must read as zeros) on this pool,
 * so that it keeps to the caller's thread limit and wakes no second pool. */
#define SS_ZERO_CHUNK 16384

static void zero_task(void *ctx, int64_t begin, int64_t end) {
    float *dst = (float *)ctx;
    const int64_t stop = end * SS_ZERO_CHUNK;
    memset(dst + begin * SS_ZERO_CHUNK, 0, (size_t)(stop - begin * SS_ZERO_CHUNK) * sizeof(float));
}

SS_EXPORT void ss_zero(float *dst, int64_t count, int threads) {
    RECORD(OP_ZERO, RP(dst), count, threads);
    if (count <= 0) return;
    const int64_t chunks = count / SS_ZERO_CHUNK;
    if (count < 4 * SS_SERIAL_VALUES) threads = 1;
    parallel_for(threads, chunks, zero_task, dst);
    memset(dst + chunks * SS_ZERO_CHUNK, 0, (size_t)(count - chunks * SS_ZERO_CHUNK) * sizeof(float));
}

/* dst[j] = src[stride * j] for j < count; src holds `avail` readable floats. */
typedef void (*strided_fn)(float *dst, const float *src, int64_t count, int64_t stride,
                           int64_t avail);

static void strided_copy_portable(float *dst, const float *src, int64_t count, int64_t stride,
                                  int64_t avail) {
    (void)avail;
    for (int64_t j = 0; j < count; j++) dst[j] = src[stride * j];
}

#if SS_X86
__attribute__((target("avx512f"))) static void
strided_copy_avx512(float *dst, const float *src, int64_t count, int64_t stride, int64_t avail) {
    int64_t j = 0;
    if (stride == 2) {
        const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                               28, 30);
        for (; j + 16 <= count && 2 * j + 32 <= avail; j += 16) {
            const __m512 lo = _mm512_loadu_ps(src + 2 * j), hi = _mm512_loadu_ps(src + 2 * j + 16);
            _mm512_storeu_ps(dst + j, _mm512_permutex2var_ps(lo, even, hi));
        }
    }
    for (; j < count; j++) dst[j] = src[stride * j];
}

__attribute__((target("avx2,fma"))) static void
strided_copy_avx2(float *dst, const float *src, int64_t count, int64_t stride, int64_t avail) {
    int64_t j = 0;
    if (stride == 2) {
        for (; j + 8 <= count && 2 * j + 16 <= avail; j += 8) {
            const __m256 lo = _mm256_loadu_ps(src + 2 * j), hi = _mm256_loadu_ps(src + 2 * j + 8);
            const __m256 mixed = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
            const __m256d ordered = _mm256_permute4x64_pd(_mm256_castps_pd(mixed), 0xD8);
            _mm256_storeu_ps(dst + j, _mm256_castpd_ps(ordered));
        }
    }
    for (; j < count; j++) dst[j] = src[stride * j];
}
#endif

static strided_fn strided_copy_fn(void) {
#if SS_X86
    switch (ss_isa()) {
    case ISA_AVX512: return strided_copy_avx512;
    case ISA_AVX2: return strided_copy_avx2;
    default: break;
    }
#endif
    return strided_copy_portable;
}

typedef struct {
    const float *in;
    float *out;
    int64_t n, h, w, pad_t, pad_l, stride, hq, wq, ch_stride;
} planes_args;

static void planes_task(void *ctx, int64_t begin, int64_t end) {
    const planes_args *a = (const planes_args *)ctx;
    const int64_t s = a->stride, plane = a->n * a->hq * a->wq;
    const strided_fn copy = strided_copy_fn();
    for (int64_t c = begin; c < end; c++) {
        float *dst_c = a->out + c * a->ch_stride;
        const float *src_c = a->in + c * a->n * a->h * a->w;
        for (int64_t pa = 0; pa < s; pa++)
            for (int64_t pb = 0; pb < s; pb++) {
                float *dst_p = dst_c + (pa * s + pb) * plane;
                for (int64_t n = 0; n < a->n; n++)
                    for (int64_t i = 0; i < a->hq; i++) {
                        float *dst = dst_p + (n * a->hq + i) * a->wq;
                        const int64_t y = s * i + pa - a->pad_t;
                        if (y < 0 || y >= a->h) {
                            memset(dst, 0, sizeof(float) * a->wq);
                            continue;
                        }
                        const float *src = src_c + (n * a->h + y) * a->w;
                        if (s == 1) {
                            /* a padded row: zeros, the row, zeros */
                            const int64_t left = a->pad_l < a->wq ? a->pad_l : a->wq;
                            memset(dst, 0, sizeof(float) * left);
                            int64_t count = a->w;
                            if (left + count > a->wq) count = a->wq - left;
                            if (count > 0) memcpy(dst + left, src, sizeof(float) * count);
                            const int64_t done = left + (count > 0 ? count : 0);
                            if (done < a->wq) memset(dst + done, 0, sizeof(float) * (a->wq - done));
                        } else {
                            /* columns j with 0 <= s*j + pb - pad_l < w are copied, the rest 0 */
                            const int64_t first = a->pad_l - pb;
                            int64_t j0 = first <= 0 ? 0 : (first + s - 1) / s;
                            int64_t j1 = (a->w + a->pad_l - pb + s - 1) / s;
                            if (j0 > a->wq) j0 = a->wq;
                            if (j1 > a->wq) j1 = a->wq;
                            if (j1 < j0) j1 = j0;
                            for (int64_t j = 0; j < j0; j++) dst[j] = 0.0f;
                            if (j1 > j0) {
                                const int64_t x0 = s * j0 + pb - a->pad_l;
                                copy(dst + j0, src + x0, j1 - j0, s, a->w - x0);
                            }
                            for (int64_t j = j1; j < a->wq; j++) dst[j] = 0.0f;
                        }
                    }
            }
    }
}

/* Zero-pad a channel-major (C, N, H, W) input and split it into stride x stride parity
 * planes: out[c*ch_stride + (a*stride + b)*N*hq*wq + (n*hq + i)*wq + j] =
 * in[c, n, stride*i + a - pad_t, stride*j + b - pad_l] (0 outside the image). */
SS_EXPORT void ss_pad_planes(const float *in, float *out, int64_t c, int64_t n, int64_t h,
                             int64_t w, int64_t pad_t, int64_t pad_l, int64_t stride, int64_t hq,
                             int64_t wq, int64_t ch_stride, int threads) {
    RECORD(OP_PAD_PLANES, RP(in), RP(out), c, n, h, w, pad_t, pad_l, stride, hq, wq, ch_stride,
           threads);
    planes_args a = {in, out, n, h, w, pad_t, pad_l, stride, hq, wq, ch_stride};
    if (c * ch_stride < SS_SERIAL_VALUES) threads = 1;
    parallel_for(threads, c, planes_task, &a);
}

typedef struct {
    const float *in;
    float *out;
    int64_t n, h, w, stride, ho, wo;
} subsample_args;

static void subsample_task(void *ctx, int64_t begin, int64_t end) {
    const subsample_args *a = (const subsample_args *)ctx;
    const strided_fn copy = strided_copy_fn();
    for (int64_t c = begin; c < end; c++)
        for (int64_t n = 0; n < a->n; n++)
            for (int64_t i = 0; i < a->ho; i++) {
                const float *src = a->in + ((c * a->n + n) * a->h + i * a->stride) * a->w;
                copy(a->out + ((c * a->n + n) * a->ho + i) * a->wo, src, a->wo, a->stride, a->w);
            }
}

/* out (C, N, ho, wo) = in[:, :, ::stride, ::stride] of a channel-major (C, N, h, w) input. */
SS_EXPORT void ss_subsample(const float *in, float *out, int64_t c, int64_t n, int64_t h,
                            int64_t w, int64_t stride, int64_t ho, int64_t wo, int threads) {
    RECORD(OP_SUBSAMPLE, RP(in), RP(out), c, n, h, w, stride, ho, wo, threads);
    subsample_args a = {in, out, n, h, w, stride, ho, wo};
    if (c * n * ho * wo < SS_SERIAL_VALUES) threads = 1;
    parallel_for(threads, c, subsample_task, &a);
}

typedef struct {
    const float *in;
    float *out;
    const float *residual;
    int64_t n, hq, wq, ho, wo, ld_in;
    float lo, hi;
} compact_args;

static void compact_task(void *ctx, int64_t begin, int64_t end) {
    const compact_args *a = (const compact_args *)ctx;
    const int64_t out_ch = a->n * a->ho * a->wo;
    for (int64_t c = begin; c < end; c++)
        for (int64_t n = 0; n < a->n; n++)
            for (int64_t i = 0; i < a->ho; i++) {
                const float *src = a->in + c * a->ld_in + (n * a->hq + i) * a->wq;
                const int64_t o = c * out_ch + (n * a->ho + i) * a->wo;
                float *dst = a->out + o;
                if (a->residual) {
                    const float *res = a->residual + o;
                    for (int64_t j = 0; j < a->wo; j++)
                        dst[j] = clampf(src[j] + res[j], a->lo, a->hi);
                } else {
                    memcpy(dst, src, sizeof(float) * a->wo);
                }
            }
}

/* Drop the junk columns and rows of a shifted-window output: out (C, N, ho, wo) from
 * in[c*ld_in + (n*hq + i)*wq + j]; with a residual (same shape as out), out = clamp(in +
 * residual, lo, hi). */
SS_EXPORT void ss_compact(const float *in, float *out, const float *residual, int64_t c,
                          int64_t n, int64_t hq, int64_t wq, int64_t ho, int64_t wo,
                          int64_t ld_in, float lo, float hi, int threads) {
    RECORD(OP_COMPACT, RP(in), RP(out), RP(residual), c, n, hq, wq, ho, wo, ld_in, float_bits(lo),
           float_bits(hi), threads);
    compact_args a = {in, out, residual, n, hq, wq, ho, wo, ld_in, lo, hi};
    if (c * n * ho * wo < SS_SERIAL_VALUES) threads = 1;
    parallel_for(threads, c, compact_task, &a);
}

typedef struct {
    const float *in;
    float *out;
    int64_t n, h, w, kh, kw, stride, pad, ho, wo;
} pool_args;

static void maxpool_task(void *ctx, int64_t begin, int64_t end) {
    const pool_args *a = (const pool_args *)ctx;
    const strided_fn copy = strided_copy_fn();
    /* row: the max over the window's rows at padded column pad + x (-inf in the padding);
     * cols: the max over the window's columns starting at each padded column */
    const int64_t n_cols = (a->wo - 1) * a->stride + 1;
    int64_t len = a->w + 2 * a->pad;
    if (len < n_cols + a->kw) len = n_cols + a->kw;
    float *row = (float *)malloc(sizeof(float) * (size_t)(2 * len));
    if (!row) return;
    float *cols = row + len;
    for (int64_t x = 0; x < len; x++) row[x] = -INFINITY;
    float *mid = row + a->pad;
    for (int64_t plane = begin; plane < end; plane++) {
        const float *src = a->in + plane * a->h * a->w;
        float *dst = a->out + plane * a->ho * a->wo;
        for (int64_t i = 0; i < a->ho; i++) {
            const int64_t y0 = i * a->stride - a->pad;
            int first = 1;
            for (int64_t dy = 0; dy < a->kh; dy++) {
                const int64_t y = y0 + dy;
                if (y < 0 || y >= a->h) continue;
                const float *r = src + y * a->w;
                if (first) {
                    memcpy(mid, r, sizeof(float) * (size_t)a->w);
                    first = 0;
                } else {
                    for (int64_t x = 0; x < a->w; x++) mid[x] = r[x] > mid[x] ? r[x] : mid[x];
                }
            }
            if (first)
                for (int64_t x = 0; x < a->w; x++) mid[x] = -INFINITY;
            /* both loops vectorize: no branches, contiguous loads */
            memcpy(cols, row, sizeof(float) * (size_t)n_cols);
            for (int64_t dx = 1; dx < a->kw; dx++) {
                const float *r = row + dx;
                for (int64_t x = 0; x < n_cols; x++) cols[x] = r[x] > cols[x] ? r[x] : cols[x];
            }
            copy(dst + i * a->wo, cols, a->wo, a->stride, n_cols);
        }
    }
    free(row);
}

/* Max pooling over `planes` contiguous (h, w) planes (padding counts as -inf). */
SS_EXPORT void ss_maxpool(const float *in, float *out, int64_t planes, int64_t h, int64_t w,
                          int64_t kh, int64_t kw, int64_t stride, int64_t pad, int64_t ho,
                          int64_t wo, int threads) {
    RECORD(OP_MAXPOOL, RP(in), RP(out), planes, h, w, kh, kw, stride, pad, ho, wo, threads);
    pool_args a = {in, out, 0, h, w, kh, kw, stride, pad, ho, wo};
    if (planes * h * w < SS_SERIAL_VALUES) threads = 1;
    parallel_for(threads, planes, maxpool_task, &a);
}

/* Global average pooling: out[q] = the mean of plane q's `size` values. Eight running sums a
 * plane, so that the compiler keeps them in one vector register. */
typedef struct {
    const float *in;
    float *out;
    int64_t size;
} mean_args;

static void plane_mean_task(void *ctx, int64_t begin, int64_t end) {
    const mean_args *a = (const mean_args *)ctx;
    const float scale = 1.0f / (float)a->size;
    for (int64_t q = begin; q < end; q++) {
        const float *x = a->in + q * a->size;
        float acc[8] = {0};
        int64_t i = 0;
        for (; i + 8 <= a->size; i += 8)
            for (int k = 0; k < 8; k++) acc[k] += x[i + k];
        for (int k = 0; i < a->size; i++, k++) acc[k] += x[i];
        const float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        a->out[q] = sum * scale;
    }
}

SS_EXPORT void ss_plane_mean(const float *in, float *out, int64_t planes, int64_t size,
                             int threads) {
    RECORD(OP_PLANE_MEAN, RP(in), RP(out), planes, size, threads);
    if (planes <= 0 || size <= 0) return;
    mean_args a = {in, out, size};
    if (planes * size < SS_SERIAL_VALUES) threads = 1;
    parallel_for(threads, planes, plane_mean_task, &a);
}

/* ------------------------------------------------------------------------------------------ */
/* Depthwise convolution. Each (channel, image) plane is copied into a zero-padded buffer of
 * its own (split into parity planes when strided) that stays in cache, and its output is a
 * sum of shifted windows over that buffer, with the bias and the clamp fused: the input is
 * read once and the output written once, where the generic path writes and reads back the
 * padded input and a junk-column output. Only the plane's interior is copied: the padding of
 * the buffer is zeroed once and stays zero from plane to plane. Each instruction set gets its
 * own copy of the plane loop, so that the short row copies and windows are inlined.          */

typedef struct {
    const float *in;
    float *out;
    const float *values;
    const int32_t *taps; /* per nonzero: its offset in a plane's padded buffer */
    const int32_t *row_ptr;
    const float *bias; /* may be NULL */
    int64_t n, h, w, pad_t, pad_l, stride, hq, wq, ho, wo;
    float lo, hi;
} depthwise_args;

/* dst[r*ld_dst + q] = clamp(b + sum_k w[k] * src[r*ld_src + taps[k] + q], lo, hi) for rows
 * r in [0, rows) and q in [0, count). */
typedef void (*window_fn)(float *dst, int64_t ld_dst, const float *src, int64_t ld_src,
                          int64_t rows, const float *w, const int32_t *taps, int nt, float b,
                          float lo, float hi, int64_t count);

/* even[j] = src[2j] for j < ceil(w/2), odd[j] = src[2j + 1] for j < floor(w/2). */
typedef void (*split_fn)(float *even, float *odd, const float *src, int64_t w);

/* Fill the interior of plane `item`'s padded buffer and compute its output. Inlined into each
 * instruction set's task with that set's `window`, `copy` and `split` (NULL: stride 2 goes
 * through `copy` like other strides). */
static inline __attribute__((always_inline)) void
depthwise_plane(const depthwise_args *a, int64_t item, float *buf, float *tmp, int by_rows,
                window_fn window, strided_fn copy, split_fn split) {
    const int64_t s = a->stride, plane = a->hq * a->wq, wq = a->wq;
    const int64_t c = item / a->n;
    const float *src = a->in + item * a->h * a->w;
    float *dst = a->out + item * a->ho * a->wo;
    if (split && s == 2) {
        /* each image row split once into its even and odd padded columns */
        const int64_t pl = a->pad_l;
        for (int64_t y = 0; y < a->h; y++) {
            const int64_t u = y + a->pad_t, i = u / 2;
            if (i >= a->hq) break;
            float *p0 = buf + (u % 2) * 2 * plane + i * wq, *p1 = p0 + plane;
            if (pl % 2 == 0) split(p0 + pl / 2, p1 + pl / 2, src + y * a->w, a->w);
            else split(p1 + pl / 2, p0 + pl / 2 + 1, src + y * a->w, a->w);
        }
    } else {
    /* parity plane (pa, pb) holds rows i with 0 <= s*i + pa - pad_t < h and columns j with
     * 0 <= s*j + pb - pad_l < w of the image */
    for (int64_t pa = 0; pa < s; pa++)
        for (int64_t pb = 0; pb < s; pb++) {
            float *p = buf + (pa * s + pb) * plane;
            const int64_t top = a->pad_t - pa, left = a->pad_l - pb;
            const int64_t i0 = top <= 0 ? 0 : (top + s - 1) / s;
            int64_t i1 = (a->h + top + s - 1) / s;
            const int64_t j0 = left <= 0 ? 0 : (left + s - 1) / s;
            int64_t j1 = (a->w + left + s - 1) / s;
            if (i1 > a->hq) i1 = a->hq;
            if (j1 > wq) j1 = wq;
            if (j1 <= j0) continue;
            const int64_t x0 = s * j0 - left;
            for (int64_t i = i0; i < i1; i++)
                copy(p + i * wq + j0, src + (s * i - top) * a->w + x0, j1 - j0, s, a->w - x0);
        }
    }
    const int32_t k0 = a->row_ptr[c], nt = a->row_ptr[c + 1] - k0;
    const float b = a->bias ? a->bias[c] : 0.0f;
    if (by_rows) {
        window(dst, a->wo, buf, wq, a->ho, a->values + k0, a->taps + k0, nt, b, a->lo, a->hi,
               a->wo);
    } else {
        window(tmp, 0, buf, 0, 1, a->values + k0, a->taps + k0, nt, b, a->lo, a->hi,
               (a->ho - 1) * wq + a->wo);
        for (int64_t i = 0; i < a->ho; i++) copy(dst + i * a->wo, tmp + i * wq, a->wo, 1, a->wo);
    }
}

/* Ask for the next plane's input while this one is computed: a plane is a few KB, too short
 * a run for the hardware prefetcher to get ahead of it (1.4-1.9x on small planes read from
 * memory). */
static inline void depthwise_prefetch(const depthwise_args *a, int64_t item, int64_t end) {
    if (item + 1 >= end) return;
    const char *next = (const char *)(a->in + (item + 1) * a->h * a->w);
    const int64_t bytes = a->h * a->w * (int64_t)sizeof(float);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(next + off, 0, 2);
}

/* The plane buffer (zeroed) and, unless the output is computed row by row, room for a whole
 * shifted window. Rows go straight into the output unless short rows would leave most of the
 * `lanes` of a vector idle. */
static float *depthwise_buffer(const depthwise_args *a, int64_t lanes, int *by_rows) {
    const int64_t n_pix = (a->ho - 1) * a->wq + a->wo; /* the shifted window, junk included */
    const int64_t row_lanes = a->ho * ((a->wo + lanes - 1) / lanes) * lanes;
    const int64_t flat_lanes = (n_pix + lanes - 1) / lanes * lanes + n_pix / 4;
    *by_rows = row_lanes <= flat_lanes;
    const int64_t size = a->stride * a->stride * a->hq * a->wq + (*by_rows ? 0 : n_pix);
    return (float *)calloc((size_t)size, sizeof(float));
}

static void window_row_portable(float *dst, const float *src, const float *w,
                                const int32_t *taps, int nt, float b, float lo, float hi,
                                int64_t count) {
    float acc[64];
    for (int64_t q0 = 0; q0 < count; q0 += 64) {
        const int64_t m = count - q0 < 64 ? count - q0 : 64;
        for (int64_t q = 0; q < m; q++) acc[q] = b;
        for (int k = 0; k < nt; k++) {
            const float wk = w[k];
            const float *s = src + taps[k] + q0;
            for (int64_t q = 0; q < m; q++) acc[q] += wk * s[q];
        }
        for (int64_t q = 0; q < m; q++) dst[q0 + q] = clampf(acc[q], lo, hi);
    }
}

static void window_portable(float *dst, int64_t ld_dst, const float *src, int64_t ld_src,
                            int64_t rows, const float *w, const int32_t *taps, int nt, float b,
                            float lo, float hi, int64_t count) {
    for (int64_t r = 0; r < rows; r++)
        window_row_portable(dst + r * ld_dst, src + r * ld_src, w, taps, nt, b, lo, hi, count);
}

static void depthwise_task_portable(void *ctx, int64_t begin, int64_t end) {
    const depthwise_args *a = (const depthwise_args *)ctx;
    int by_rows;
    float *buf = depthwise_buffer(a, 1, &by_rows);
    if (!buf) return;
    float *tmp = buf + a->stride * a->stride * a->hq * a->wq;
    for (int64_t item = begin; item < end; item++) {
        depthwise_prefetch(a, item, end);
        depthwise_plane(a, item, buf, tmp, by_rows, window_portable, strided_copy_portable,
                        NULL);
    }
    free(buf);
}

#if SS_X86
/* dst[j] = src[stride * j] for j < count, src holding `avail` floats: stride 1 and 2 in
 * masked vectors, so that short rows cost no scalar tails. */
__attribute__((target("avx512f"))) static inline void
copy_avx512(float *dst, const float *src, int64_t count, int64_t stride, int64_t avail) {
    if (stride == 1) {
        for (int64_t j = 0; j < count; j += 16) {
            const int64_t rem = count - j;
            const __mmask16 m = (__mmask16)(rem >= 16 ? 0xFFFF : ((1u << rem) - 1u));
            _mm512_mask_storeu_ps(dst + j, m, _mm512_maskz_loadu_ps(m, src + j));
        }
    } else if (stride == 2) {
        const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                               28, 30);
        for (int64_t j = 0; j < count; j += 16) {
            const int64_t rem = count - j, left = avail - 2 * j;
            const __mmask16 m = (__mmask16)(rem >= 16 ? 0xFFFF : ((1u << rem) - 1u));
            const __mmask16 m_lo = (__mmask16)(left >= 16 ? 0xFFFF : ((1u << left) - 1u));
            const __mmask16 m_hi =
                (__mmask16)(left >= 32 ? 0xFFFF : (left <= 16 ? 0u : ((1u << (left - 16)) - 1u)));
            const __m512 lo = _mm512_maskz_loadu_ps(m_lo, src + 2 * j);
            const __m512 hi = _mm512_maskz_loadu_ps(m_hi, src + 2 * j + 16);
            _mm512_mask_storeu_ps(dst + j, m, _mm512_permutex2var_ps(lo, even, hi));
        }
    } else {
        for (int64_t j = 0; j < count; j++) dst[j] = src[stride * j];
    }
}

__attribute__((target("avx512f"))) static inline void split_avx512(float *even, float *odd,
                                                                   const float *src, int64_t w) {
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int64_t x = 0; x < w; x += 32) {
        const int64_t left = w - x, j = x / 2;
        const int64_t ne = left >= 32 ? 16 : (left + 1) / 2, no = left >= 32 ? 16 : left / 2;
        const __mmask16 m_lo = (__mmask16)(left >= 16 ? 0xFFFF : ((1u << left) - 1u));
        const __mmask16 m_hi =
            (__mmask16)(left >= 32 ? 0xFFFF : (left <= 16 ? 0u : ((1u << (left - 16)) - 1u)));
        const __m512 lo = _mm512_maskz_loadu_ps(m_lo, src + x);
        const __m512 hi = _mm512_maskz_loadu_ps(m_hi, src + x + 16);
        _mm512_mask_storeu_ps(even + j, (__mmask16)((1u << ne) - 1u),
                              _mm512_permutex2var_ps(lo, ie, hi));
        _mm512_mask_storeu_ps(odd + j, (__mmask16)((1u << no) - 1u),
                              _mm512_permutex2var_ps(lo, io, hi));
    }
}

/* R rows of NV vectors each (constants once inlined), the lanes from `count` on masked: the
 * R * NV sums are independent, so short rows do not wait on the FMA latency one by one. */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
window_block_avx512(float *dst, int64_t ld_dst, const float *src, int64_t ld_src,
                    const float *w, const int32_t *taps, int nt, __m512 vb, __m512 vlo,
                    __m512 vhi, int64_t count, const int R, const int NV) {
    __mmask16 m[4];
    for (int k = 0; k < NV; k++) {
        const int64_t rem = count - 16 * k;
        m[k] = (__mmask16)(rem >= 16 ? 0xFFFF : (rem <= 0 ? 0u : (1u << rem) - 1u));
    }
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int k = 0; k < NV; k++) acc[r][k] = vb;
    for (int t = 0; t < nt; t++) {
        const __m512 wt = _mm512_set1_ps(w[t]);
        for (int r = 0; r < R; r++) {
            const float *s = src + r * ld_src + taps[t];
            for (int k = 0; k < NV; k++)
                acc[r][k] = _mm512_fmadd_ps(wt, _mm512_maskz_loadu_ps(m[k], s + 16 * k),
                                            acc[r][k]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int k = 0; k < NV; k++)
            _mm512_mask_storeu_ps(dst + r * ld_dst + 16 * k, m[k],
                                  _mm512_min_ps(_mm512_max_ps(acc[r][k], vlo), vhi));
}

__attribute__((target("avx512f"))) static inline void
window_avx512(float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
              const float *w, const int32_t *taps, int nt, float b, float lo, float hi,
              int64_t count) {
    const __m512 vb = _mm512_set1_ps(b), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
#define BLOCK(R, NV, d, s, c) \
    window_block_avx512(d, ld_dst, s, ld_src, w, taps, nt, vb, vlo, vhi, c, R, NV)
    if (count <= 64) {
        /* short rows: up to four vectors at a time, from several rows */
        const int nv = (int)((count + 15) / 16);
        const int64_t per = nv == 1 ? 4 : (nv == 2 ? 2 : 1);
        int64_t r = 0;
        for (; r + per <= rows; r += per) {
            float *d = dst + r * ld_dst;
            const float *s = src + r * ld_src;
            switch (nv) {
            case 1: BLOCK(4, 1, d, s, count); break;
            case 2: BLOCK(2, 2, d, s, count); break;
            case 3: BLOCK(1, 3, d, s, count); break;
            default: BLOCK(1, 4, d, s, count); break;
            }
        }
        for (; r < rows; r++) {
            float *d = dst + r * ld_dst;
            const float *s = src + r * ld_src;
            if (nv == 1) BLOCK(1, 1, d, s, count);
            else BLOCK(1, 2, d, s, count);
        }
        return;
    }
    for (int64_t r = 0; r < rows; r++) {
        float *d = dst + r * ld_dst;
        const float *s = src + r * ld_src;
        int64_t q = 0;
        for (; q + 64 <= count; q += 64) {
            __m512 a0 = vb, a1 = vb, a2 = vb, a3 = vb;
            for (int k = 0; k < nt; k++) {
                const __m512 wk = _mm512_set1_ps(w[k]);
                const float *sk = s + taps[k] + q;
                a0 = _mm512_fmadd_ps(wk, _mm512_loadu_ps(sk), a0);
                a1 = _mm512_fmadd_ps(wk, _mm512_loadu_ps(sk + 16), a1);
                a2 = _mm512_fmadd_ps(wk, _mm512_loadu_ps(sk + 32), a2);
                a3 = _mm512_fmadd_ps(wk, _mm512_loadu_ps(sk + 48), a3);
            }
            _mm512_storeu_ps(d + q, _mm512_min_ps(_mm512_max_ps(a0, vlo), vhi));
            _mm512_storeu_ps(d + q + 16, _mm512_min_ps(_mm512_max_ps(a1, vlo), vhi));
            _mm512_storeu_ps(d + q + 32, _mm512_min_ps(_mm512_max_ps(a2, vlo), vhi));
            _mm512_storeu_ps(d + q + 48, _mm512_min_ps(_mm512_max_ps(a3, vlo), vhi));
        }
        if (q < count) BLOCK(1, 4, d + q, s + q, count - q);
    }
#undef BLOCK
}

__attribute__((target("avx512f"))) static void depthwise_task_avx512(void *ctx, int64_t begin,
                                                                     int64_t end) {
    const depthwise_args *a = (const depthwise_args *)ctx;
    int by_rows;
    float *buf = depthwise_buffer(a, 16, &by_rows);
    if (!buf) return;
    float *tmp = buf + a->stride * a->stride * a->hq * a->wq;
    for (int64_t item = begin; item < end; item++) {
        depthwise_prefetch(a, item, end);
        depthwise_plane(a, item, buf, tmp, by_rows, window_avx512, copy_avx512, split_avx512);
    }
    free(buf);
}

__attribute__((target("avx2,fma"))) static inline void
copy_avx2(float *dst, const float *src, int64_t count, int64_t stride, int64_t avail) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    if (stride == 1) {
        for (int64_t j = 0; j < count; j += 8) {
            const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(count - j)), lane);
            _mm256_maskstore_ps(dst + j, m, _mm256_maskload_ps(src + j, m));
        }
    } else if (stride == 2) {
        for (int64_t j = 0; j < count; j += 8) {
            const int left = (int)(avail - 2 * j < 16 ? avail - 2 * j : 16);
            const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(count - j)), lane);
            const __m256i m_lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lane);
            const __m256i m_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(left - 8), lane);
            const __m256 lo = _mm256_maskload_ps(src + 2 * j, m_lo);
            const __m256 hi = _mm256_maskload_ps(src + 2 * j + 8, m_hi);
            const __m256 mixed = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
            const __m256d ordered = _mm256_permute4x64_pd(_mm256_castps_pd(mixed), 0xD8);
            _mm256_maskstore_ps(dst + j, m, _mm256_castpd_ps(ordered));
        }
    } else {
        for (int64_t j = 0; j < count; j++) dst[j] = src[stride * j];
    }
}

__attribute__((target("avx2,fma"))) static inline void
window_row_avx2(float *dst, const float *src, const float *w, const int32_t *taps, int nt,
                float b, float lo, float hi, int64_t count) {
    const __m256 vb = _mm256_set1_ps(b), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    int64_t q = 0;
    for (; q + 32 <= count; q += 32) {
        __m256 a0 = vb, a1 = vb, a2 = vb, a3 = vb;
        for (int k = 0; k < nt; k++) {
            const __m256 wk = _mm256_set1_ps(w[k]);
            const float *s = src + taps[k] + q;
            a0 = _mm256_fmadd_ps(wk, _mm256_loadu_ps(s), a0);
            a1 = _mm256_fmadd_ps(wk, _mm256_loadu_ps(s + 8), a1);
            a2 = _mm256_fmadd_ps(wk, _mm256_loadu_ps(s + 16), a2);
            a3 = _mm256_fmadd_ps(wk, _mm256_loadu_ps(s + 24), a3);
        }
        _mm256_storeu_ps(dst + q, _mm256_min_ps(_mm256_max_ps(a0, vlo), vhi));
        _mm256_storeu_ps(dst + q + 8, _mm256_min_ps(_mm256_max_ps(a1, vlo), vhi));
        _mm256_storeu_ps(dst + q + 16, _mm256_min_ps(_mm256_max_ps(a2, vlo), vhi));
        _mm256_storeu_ps(dst + q + 24, _mm256_min_ps(_mm256_max_ps(a3, vlo), vhi));
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; q < count; q += 8) {
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(count - q)), lane);
        __m256 acc = vb;
        for (int k = 0; k < nt; k++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(w[k]),
                                  _mm256_maskload_ps(src + taps[k] + q, m), acc);
        _mm256_maskstore_ps(dst + q, m, _mm256_min_ps(_mm256_max_ps(acc, vlo), vhi));
    }
}

__attribute__((target("avx2,fma"))) static inline void
window_avx2(float *dst, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
            const float *w, const int32_t *taps, int nt, float b, float lo, float hi,
            int64_t count) {
    for (int64_t r = 0; r < rows; r++)
        window_row_avx2(dst + r * ld_dst, src + r * ld_src, w, taps, nt, b, lo, hi, count);
}

__attribute__((target("avx2,fma"))) static void depthwise_task_avx2(void *ctx, int64_t begin,
                                                                   int64_t end) {
    const depthwise_args *a = (const depthwise_args *)ctx;
    int by_rows;
    float *buf = depthwise_buffer(a, 8, &by_rows);
    if (!buf) return;
    float *tmp = buf + a->stride * a->stride * a->hq * a->wq;
    for (int64_t item = begin; item < end; item++) {
        depthwise_prefetch(a, item, end);
        depthwise_plane(a, item, buf, tmp, by_rows, window_avx2, copy_avx2, NULL);
    }
    free(buf);
}
#endif

/* Depthwise convolution of a channel-major (C, N, h, w) input into (C, N, ho, wo):
 * out[c, n, i, j] = clamp(bias[c] + sum_k values[k] * P[taps[k] + i*wq + j], lo, hi), k in
 * [row_ptr[c], row_ptr[c+1]), where P is plane (c, n) zero-padded by (pad_t, pad_l) and split
 * into stride x stride parity planes of hq x wq: P[(a*stride + b)*hq*wq + i*wq + j] =
 * in[c, n, stride*i + a - pad_t, stride*j + b - pad_l] (0 outside the image). */
SS_EXPORT void ss_depthwise(const float *in, float *out, const float *values,
                            const int32_t *taps, const int32_t *row_ptr, const float *bias,
                            int64_t c, int64_t n, int64_t h, int64_t w, int64_t pad_t,
                            int64_t pad_l, int64_t stride, int64_t hq, int64_t wq, int64_t ho,
                            int64_t wo, float lo, float hi, int threads) {
    RECORD(OP_DEPTHWISE, RP(in), RP(out), RP(values), RP(taps), RP(row_ptr), RP(bias), c, n, h, w,
           pad_t, pad_l, stride, hq, wq, ho, wo, float_bits(lo), float_bits(hi), threads);
    if (c <= 0 || n <= 0 || ho <= 0 || wo <= 0) return;
    depthwise_args a = {in, out, values, taps, row_ptr, bias, n, h, w, pad_t, pad_l, stride,
                        hq, wq, ho, wo, lo, hi};
    task_fn task = depthwise_task_portable;
#if SS_X86
    if (ss_isa() == ISA_AVX512) task = depthwise_task_avx512;
    else if (ss_isa() == ISA_AVX2) task = depthwise_task_avx2;
#endif
    if (c * n * (h * w + ho * wo) < 2 * SS_SERIAL_VALUES) threads = 1;
    parallel_for(threads, c * n, task, &a);
}

/* ------------------------------------------------------------------------------------------ */
/* (A, B, inner) -> (B, A, inner): the standard <-> channel-major layouts of a batch, and a
 * Linear layer's input and output at more than one sample. */

typedef struct {
    const float *in;
    float *out;
    int64_t a, b, inner;
} swap_args;

#define SS_SWAP_BLOCK 32

#if SS_X86
/* An 8x8 block, transposed in registers: each row read and written whole. Reading one value
 * a row, as the scalar loop does, makes rows 4 KB apart (1024 floats) compete for the same
 * few cache lines: a (256, 1024) swap ran 4-5x slower than a (1024, 256) one. */
__attribute__((target("avx2"))) static void transpose8_avx2(const float *in, int64_t ld_in,
                                                            float *out, int64_t ld_out) {
    __m256 r[8], t[8], u[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(in + k * ld_in);
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]); /* a00 a10 a01 a11 | a04 a14 a05 a15 */
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44); /* column 0 | column 4, 4 rows */
        u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
        u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps(out + k * ld_out, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
        _mm256_storeu_ps(out + (k + 4) * ld_out, _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
    }
}
#endif

static void swap_task(void *ctx, int64_t begin, int64_t end) {
    const swap_args *s = (const swap_args *)ctx;
    if (s->inner > 1) {
        for (int64_t j = begin; j < end; j++)
            for (int64_t i = 0; i < s->a; i++)
                memcpy(s->out + (j * s->a + i) * s->inner, s->in + (i * s->b + j) * s->inner,
                       sizeof(float) * (size_t)s->inner);
        return;
    }
    /* a plain transpose, in blocks that stay in cache */
#if SS_X86
    const int simd = ss_isa() != ISA_PORTABLE;
    /* The 8 rows of a tile's side that the block sweeps (input rows, or output rows) are read
     * or written whole; the other side's 32 rows a part at a time, which costs most where they
     * lie a multiple of 4 KB apart. So the side whose rows are the further apart in powers of
     * two is swept: a (256, 1024) swap ran 7.9x faster than with one value a row, and a
     * (1024, 256) one 0.78x as fast with the input's rows swept instead. */
    const int in_rows_first = __builtin_ctzll((unsigned long long)s->b) >=
                              __builtin_ctzll((unsigned long long)s->a);
#endif
    for (int64_t j0 = begin; j0 < end; j0 += SS_SWAP_BLOCK) {
        const int64_t j1 = j0 + SS_SWAP_BLOCK < end ? j0 + SS_SWAP_BLOCK : end;
        for (int64_t i0 = 0; i0 < s->a; i0 += SS_SWAP_BLOCK) {
            const int64_t i1 = i0 + SS_SWAP_BLOCK < s->a ? i0 + SS_SWAP_BLOCK : s->a;
            int64_t i8 = i0, j8 = j0; /* where the 8x8 tiles end */
#if SS_X86
            if (simd) {
                i8 = i0 + (i1 - i0) / 8 * 8;
                j8 = j0 + (j1 - j0) / 8 * 8;
                if (in_rows_first)
                    for (int64_t i = i0; i < i8; i += 8)
                        for (int64_t j = j0; j < j8; j += 8)
                            transpose8_avx2(s->in + i * s->b + j, s->b, s->out + j * s->a + i,
                                            s->a);
                else
                    for (int64_t j = j0; j < j8; j += 8)
                        for (int64_t i = i0; i < i8; i += 8)
                            transpose8_avx2(s->in + i * s->b + j, s->b, s->out + j * s->a + i,
                                            s->a);
            }
#endif
            for (int64_t j = j0; j < j1; j++) /* what the tiles left: whole rows, then columns */
                for (int64_t i = j < j8 ? i8 : i0; i < i1; i++)
                    s->out[j * s->a + i] = s->in[i * s->b + j];
        }
    }
}

SS_EXPORT void ss_swap01(const float *in, float *out, int64_t a, int64_t b, int64_t inner,
                         int threads) {
    RECORD(OP_SWAP01, RP(in), RP(out), a, b, inner, threads);
    if (a <= 0 || b <= 0 || inner <= 0) return;
    swap_args s = {in, out, a, b, inner};
    if (a * b * inner < SS_SERIAL_VALUES) threads = 1;
    parallel_for(threads, b, swap_task, &s);
}

/* ------------------------------------------------------------------------------------------ */
/* Replay. A plan is a sequence of calls, each [op, n, then n (kind, value) pairs]: kind 0 is
 * the value itself, 1 an address `value` bytes into the input, 2 an address `value` bytes into
 * the arena. Returns 0, or -1 for a malformed plan (nothing after the bad call runs). */

#define PA(i) ((void *)(intptr_t)a[i])
#define FA(i) bits_float(a[i])

SS_EXPORT int ss_run_plan(const int64_t *plan, int64_t n_words, char *input, char *arena) {
    int64_t a[SS_MAX_ARGS];
    for (int64_t i = 0; i < n_words;) {
        if (i + 2 > n_words) return -1;
        const int64_t op = plan[i], n = plan[i + 1];
        if (n < 0 || n > SS_MAX_ARGS || i + 2 + 2 * n > n_words) return -1;
        for (int64_t k = 0; k < n; k++) {
            const int64_t kind = plan[i + 2 + 2 * k], value = plan[i + 3 + 2 * k];
            a[k] = kind == 1 ? RP(input + value) : kind == 2 ? RP(arena + value) : value;
        }
        i += 2 + 2 * n;
        switch (op) {
        case OP_SPMM:
            if (n != 14) return -1;
            ss_spmm(PA(0), PA(1), PA(2), PA(3), PA(4), PA(5), PA(6), a[7], a[8], a[9], a[10],
                    FA(11), FA(12), (int)a[13]);
            break;
        case OP_SPMM_MAPPED:
            if (n != 15) return -1;
            if (ss_spmm_mapped(PA(0), PA(1), PA(2), PA(3), PA(4), PA(5), PA(6), a[7], a[8], a[9],
                               a[10], FA(11), FA(12), (int)a[13], PA(14)))
                return -1;
            break;
        case OP_SPMM_WINDOWS:
            if (n != 18) return -1;
            if (ss_spmm_windows(PA(0), PA(1), PA(2), PA(3), PA(4), PA(5), PA(6), a[7], a[8], a[9],
                                a[10], FA(11), FA(12), (int)a[13], PA(14), PA(15), PA(16), a[17]))
                return -1;
            break;
        case OP_ZERO:
            if (n != 3) return -1;
            ss_zero(PA(0), a[1], (int)a[2]);
            break;
        case OP_PAD_PLANES:
            if (n != 13) return -1;
            ss_pad_planes(PA(0), PA(1), a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10],
                          a[11], (int)a[12]);
            break;
        case OP_SUBSAMPLE:
            if (n != 10) return -1;
            ss_subsample(PA(0), PA(1), a[2], a[3], a[4], a[5], a[6], a[7], a[8], (int)a[9]);
            break;
        case OP_COMPACT:
            if (n != 13) return -1;
            ss_compact(PA(0), PA(1), PA(2), a[3], a[4], a[5], a[6], a[7], a[8], a[9], FA(10),
                       FA(11), (int)a[12]);
            break;
        case OP_MAXPOOL:
            if (n != 12) return -1;
            ss_maxpool(PA(0), PA(1), a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10],
                       (int)a[11]);
            break;
        case OP_PLANE_MEAN:
            if (n != 5) return -1;
            ss_plane_mean(PA(0), PA(1), a[2], a[3], (int)a[4]);
            break;
        case OP_DEPTHWISE:
            if (n != 20) return -1;
            ss_depthwise(PA(0), PA(1), PA(2), PA(3), PA(4), PA(5), a[6], a[7], a[8], a[9], a[10],
                         a[11], a[12], a[13], a[14], a[15], a[16], FA(17), FA(18), (int)a[19]);
            break;
        case OP_SWAP01:
            if (n != 6) return -1;
            ss_swap01(PA(0), PA(1), a[2], a[3], a[4], (int)a[5]);
            break;
        case OP_SPMM_SHIFTED:
            if (n != 20) return -1;
            if (ss_spmm_shifted(PA(0), PA(1), PA(2), PA(3), PA(4), PA(5), PA(6), a[7], a[8], a[9],
                                a[10], FA(11), FA(12), (int)a[13], PA(14), PA(15), PA(16), a[17],
                                a[18], a[19]))
                return -1;
            break;
        case OP_SPMM_CHUNKED:
            if (n != 15) return -1;
            ss_spmm_chunked(PA(0), PA(1), PA(2), PA(3), PA(4), PA(5), PA(6), a[7], a[8], a[9],
                            a[10], FA(11), FA(12), (int)a[13], a[14]);
            break;
        default:
            return -1;
        }
    }
    ss_sync();
    return 0;
}

#ifndef SS_NO_PYTHON
/* A Python module with no functions, so that the import system can locate this library. */
static struct PyModuleDef kernels_module = {PyModuleDef_HEAD_INIT, "_kernels",
                                            "strsparse's native sparse kernels (used through ctypes)",
                                            -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
#endif
