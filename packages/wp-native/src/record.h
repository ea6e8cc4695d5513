/* Internal: reading one snapshot record (docs/format.md) — its header,
 * CRC-32 and LZ4 payload — for the restorer. */
#ifndef VMSNAP_WP_RECORD_H
#define VMSNAP_WP_RECORD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vmsnap_record.h"

#define RECORD_HEADER_BYTES WP_RECORD_HEADER_BYTES
#define RECORD_MAGIC 0x31444352u /* "RCD1" */
#define RECORD_MAX_PAGES WP_RECORD_MAX_PAGES

enum { RECORD_RAW = WP_RECORD_RAW, RECORD_LZ4 = WP_RECORD_LZ4, RECORD_ZERO = WP_RECORD_ZERO };

/* CRC-32 (zlib's) of p, continuing from crc (0 to start). */
uint32_t record_crc32(uint32_t crc, const uint8_t *p, size_t n);

/* Decodes one LZ4 block (liblz4) into dst; the bytes produced, or -1 if
 * malformed or bigger than dst_cap. */
int64_t record_lz4_decode(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap);

/* Reads the record at file_offset, which the index says holds `pages`
 * pages of `region` from first_page, into out (pages * 4096 bytes; zero
 * records are zeroed), with the rules of wp_record_check/wp_record_decode
 * (the one decoder). scratch holds a compressed payload (scratch_cap bytes:
 * pages * 4096 + 1024 is always enough). With raw, the file is a raw image
 * and the "record" is just the bytes at file_offset. Returns the RECORD_*
 * encoding or -errno (-EBADMSG: corrupt, why in *why_out; -EIO: short). */
int record_read(const wp_record_codec *c, int file, bool raw, uint64_t file_offset, uint32_t region, uint64_t first_page,
                uint32_t pages, uint8_t *out, uint8_t *scratch, size_t scratch_cap, uint32_t *why_out);

#endif
