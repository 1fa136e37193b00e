/* store_map.c -- packed weights from a file, without repacking (the persistent weights cache,
 * jaxmoe/cpu/weights_cache.py).
 *
 * The cache holds the bytes the kernels read (jm_store_slab's slabs, a matrix's tile stream)
 * exactly as pack.c / int4.c laid them out. Adopting maps that range of an open file read-only
 * (MAP_PRIVATE, PROT_READ; 2 MiB pages where the page cache has them: map_huge_congruent) and
 * registers matrix headers that point into the mapping: no copy, pages come from the page cache
 * on first touch. The mapping is owned like jm_alloc_node's
 * memory (data + mapping length, munmap'ed by jm_free_node), so jm_store_free and
 * jm_matrix_free release it unchanged. FP8 block scales (small) are copied into malloc'ed
 * memory, again as store.c / pack.c own them.
 *
 * NUMA: `node` is recorded on the matrices and jm_bind_node (mbind) is applied to the mapping
 * as store.c does for a slot; for file pages the page cache decides where a page already read
 * lies (mbind places pages the fault allocates; no migration is asked for).
 *
 * jm_matrix_packed gives the other direction: a matrix's packed bytes, to write the cache.
 */
#include <string.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "int4.h"
#include "internal.h"
#include "store.h"

/* header of a packed matrix over existing bytes: pack.c's geometry, INT4's as int4.c sets it */
static jm_matrix *matrix_header(int32_t format, int32_t n, int32_t k, int32_t group, int32_t node) {
  jm_matrix *m = jm_matrix_header(format, n, k, node);
  if (!m) return NULL;
  if (format == JM_FMT_INT4) { /* int4.c: jm_matrix_create_int4 */
    const int32_t sbc = 8 * group;
    m->group = group;
    m->k_pad = (k + sbc - 1) / sbc * sbc;
    m->kb = m->k_pad / JM_KBLOCK;
    m->n_rb = 1;
    m->tile_bytes = (int64_t)jm_int4_n_sb(m) * jm_int4_sb_bytes(m);
  }
  return m;
}

static int64_t scale_floats_of(int32_t format, int32_t n, int32_t k) {
  return format == JM_FMT_FP8 ? (int64_t)((n + JM_KBLOCK - 1) / JM_KBLOCK) * ((k + JM_KBLOCK - 1) / JM_KBLOCK) : 0;
}

/* mmap of [offset, offset + len) of fd at an address congruent to offset modulo 2 MiB, advised
 * MADV_HUGEPAGE: where the page cache holds the file in 2 MiB folios (a fault of such a mapping
 * reads them so; the cache's 16 MiB writes leave them so) the kernel maps them with one TLB
 * entry each, as the store's own anonymous huge pages are (docs/PERFORMANCE_MODEL.md, "The
 * price of mapping": what 4 KiB and 2 MiB mappings measured against the packed store).
 * A reservation of len + 2 MiB is made and trimmed around the mapping, which then is exactly
 * [p, p + len), as jm_free_node unmaps it. Below 2 MiB, or where the reservation fails, a
 * plain mapping. */
static void *map_huge_congruent(int fd, int64_t offset, int64_t len) {
  const size_t huge = (size_t)2 << 20, n = (size_t)len;
  if (n < huge) return mmap(NULL, n, PROT_READ, MAP_PRIVATE, fd, (off_t)offset);
  uint8_t *r = mmap(NULL, n + huge, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (r == MAP_FAILED) return mmap(NULL, n, PROT_READ, MAP_PRIVATE, fd, (off_t)offset);
  const size_t lead = ((size_t)offset - (size_t)(uintptr_t)r) & (huge - 1); /* a page multiple */
  uint8_t *p = mmap(r + lead, n, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, (off_t)offset);
  if (p == MAP_FAILED) {
    munmap(r, n + huge);
    return MAP_FAILED;
  }
  if (lead) munmap(r, lead);
  if (huge - lead) munmap(p + n, huge - lead);
#ifdef MADV_HUGEPAGE
  madvise(p, n, MADV_HUGEPAGE);
#endif
  return p;
}

/* maps [offset, offset + len) of fd read-only; checks that the file holds the range */
static uint8_t *map_range(int fd, int64_t offset, int64_t len, int32_t node, const char *fn) {
  struct stat st;
  const long page = sysconf(_SC_PAGESIZE);
  if (fd < 0 || fstat(fd, &st) != 0) {
    jm_error(JM_EINVAL, "%s: fd %d is not an open file", fn, fd);
    return NULL;
  }
  if (offset < 0 || len <= 0 || offset % page) {
    jm_error(JM_EINVAL, "%s: offset %lld must be a multiple of the page size %ld and length %lld positive", fn,
             (long long)offset, page, (long long)len);
    return NULL;
  }
  if ((int64_t)st.st_size < offset + len) {
    jm_error(JM_EINVAL, "%s: the file holds %lld bytes, the range ends at %lld (truncated?)", fn,
             (long long)st.st_size, (long long)(offset + len));
    return NULL;
  }
  void *p = map_huge_congruent(fd, offset, len);
  if (p == MAP_FAILED) {
    jm_error(JM_ENOMEM, "%s: mmap of %lld bytes failed", fn, (long long)len);
    return NULL;
  }
  jm_bind_node(p, (size_t)len, node);
#ifdef MADV_WILLNEED
  madvise(p, (size_t)len, MADV_WILLNEED);
#endif
  return p;
}

static int check_format(int32_t format, int32_t group, const char *fn) {
  if (format != JM_FMT_FP8 && format != JM_FMT_BF16 && format != JM_FMT_INT4)
    return jm_error(JM_EINVAL, "%s: unknown format %d", fn, format);
  if (format == JM_FMT_INT4 && (group < 32 || group > 256 || group % 32))
    return jm_error(JM_EINVAL, "%s: INT4 group size %d must be a multiple of 32 in [32, 256]", fn, group);
  return JM_OK;
}

jm_matrix *jm_matrix_adopt(int32_t format, int32_t n, int32_t k, int32_t group, int32_t fd, int64_t offset,
                           const float *scale, int32_t node) {
  if (check_format(format, group, "jm_matrix_adopt")) return NULL;
  if (n <= 0 || k <= 0 || (format == JM_FMT_FP8 && !scale)) {
    jm_error(JM_EINVAL, "jm_matrix_adopt: shape must be positive, got [%d, %d], and FP8 needs scales", n, k);
    return NULL;
  }
  jm_matrix *m = matrix_header(format, n, k, group, node);
  if (!m) {
    jm_error(JM_ENOMEM, "jm_matrix_adopt: out of memory");
    return NULL;
  }
  const int64_t bytes = (int64_t)m->n_tiles * m->tile_bytes, floats = scale_floats_of(format, n, k);
  if (floats) {
    m->scale = malloc(sizeof(float) * (size_t)floats);
    if (!m->scale) {
      free(m);
      jm_error(JM_ENOMEM, "jm_matrix_adopt: out of memory");
      return NULL;
    }
    memcpy(m->scale, scale, sizeof(float) * (size_t)floats);
  }
  m->data = map_range(fd, offset, bytes, node, "jm_matrix_adopt");
  if (!m->data || jm_registry_add(m) != JM_OK) {
    if (m->data) {
      munmap(m->data, (size_t)bytes);
      jm_error(JM_ENOMEM, "jm_matrix_adopt: out of memory");
    }
    free(m->scale);
    free(m);
    return NULL;
  }
  m->data_alloc = (size_t)bytes;
  return m;
}

int jm_store_adopt_slab(jm_store *s, int32_t layer, int32_t which, int32_t format, int32_t fd, int64_t offset,
                        int64_t slot_bytes, const float *scale, int32_t node) {
  if (!s || !jm_registry_has(s) || s->magic != JM_STORE_MAGIC)
    return jm_error(JM_EHANDLE, "jm_store_adopt_slab: not a live expert store");
  if (layer < 0 || layer >= s->n_layers || which < 0 || which > 2)
    return jm_error(JM_EINVAL, "jm_store_adopt_slab: layer %d / projection %d out of range", layer, which);
  jm_store_layer *l = &s->layers[layer];
  if (!l->n_experts) return jm_error(JM_EINVAL, "jm_store_adopt_slab: layer %d not initialised", layer);
  if (format != JM_FMT_FP8 && format != JM_FMT_BF16)
    return jm_error(JM_EINVAL, "jm_store_adopt_slab: format %d is not FP8 or BF16", format);
  jm_store_slab_mem *b = &l->slab[which];
  if (b->data) return jm_error(JM_EINVAL, "jm_store_adopt_slab: layer %d projection %d has a slab already", layer, which);
  for (int32_t e = 0; e < l->n_experts; e++)
    if (l->experts[e].m[which])
      return jm_error(JM_EINVAL, "jm_store_adopt_slab: layer %d expert %d projection %d is set already", layer, e, which);
  const int32_t n = which < 2 ? l->inter : l->hidden, k = which < 2 ? l->hidden : l->inter;
  const int64_t packed = jm_matrix_packed_bytes(format, n, k), floats = scale_floats_of(format, n, k);
  if (slot_bytes < packed || slot_bytes % 4096)
    return jm_error(JM_EINVAL, "jm_store_adopt_slab: slot of %lld bytes for %lld packed bytes (a 4 KiB multiple >= them)",
                    (long long)slot_bytes, (long long)packed);
  if (floats && !scale) return jm_error(JM_EINVAL, "jm_store_adopt_slab: FP8 needs block scales");
  const int64_t len = slot_bytes * l->n_experts;
  float *sc = floats ? malloc(sizeof(float) * (size_t)(floats * l->n_experts)) : NULL;
  if (floats && !sc) return jm_error(JM_ENOMEM, "jm_store_adopt_slab: out of memory");
  if (sc) memcpy(sc, scale, sizeof(float) * (size_t)(floats * l->n_experts));
  uint8_t *data = map_range(fd, offset, len, node, "jm_store_adopt_slab");
  if (!data) {
    free(sc);
    return JM_EINVAL;
  }
  jm_matrix **ms = calloc((size_t)l->n_experts, sizeof *ms);
  int rc = ms ? JM_OK : JM_ENOMEM;
  for (int32_t e = 0; e < l->n_experts && !rc; e++) {
    ms[e] = matrix_header(format, n, k, 0, node);
    if (!ms[e]) {
      rc = JM_ENOMEM;
      break;
    }
    ms[e]->data = data + e * slot_bytes;
    ms[e]->scale = sc ? sc + e * floats : NULL;
    ms[e]->borrowed = 1;
    if (jm_registry_add(ms[e]) != JM_OK) {
      free(ms[e]);
      ms[e] = NULL;
      rc = JM_ENOMEM;
    }
  }
  if (rc) {
    for (int32_t e = 0; ms && e < l->n_experts; e++) jm_matrix_free(ms[e]);
    free(ms);
    munmap(data, (size_t)len);
    free(sc);
    return jm_error(JM_ENOMEM, "jm_store_adopt_slab: out of memory");
  }
  for (int32_t e = 0; e < l->n_experts; e++) l->experts[e].m[which] = ms[e];
  free(ms);
  b->data = data;
  b->alloc = (size_t)len;
  b->slot_bytes = slot_bytes;
  b->scale = sc;
  b->scale_floats = floats;
  b->format = format;
  return JM_OK;
}

int jm_matrix_packed(const jm_matrix *m, const uint8_t **data, int64_t *bytes, const float **scale,
                     int64_t *scale_floats, int32_t *group) {
  if (!m || !jm_registry_has(m) || m->magic != JM_MATRIX_MAGIC)
    return jm_error(JM_EHANDLE, "jm_matrix_packed: not a live matrix");
  if (data) *data = m->data;
  if (bytes) *bytes = (int64_t)m->n_tiles * m->tile_bytes;
  if (scale) *scale = m->scale;
  if (scale_floats) *scale_floats = m->format == JM_FMT_FP8 ? (int64_t)m->n_rb * m->kb : 0;
  if (group) *group = m->group;
  return JM_OK;
}
