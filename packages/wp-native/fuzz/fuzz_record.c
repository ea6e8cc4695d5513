/*
 * Fuzz harness for the one decoder of records (vmsnap_record.h, record.c).
 *
 * No clang on the build machine (libFuzzer needs it), so this is a
 * standalone mutation driver built with gcc -fsanitize=address,undefined:
 * it runs N deterministic iterations (argv[1]) from the seed corpus
 * (argv[2..], files of one record each: 32-byte header + payload). Each
 * iteration mutates a seed (bit flips, byte and u32 overwrites with edge
 * values, truncation, extension, splices), in half of them repairs the
 * stored-bytes field and the CRC so the payload decoder is reached, then
 * calls wp_record_check and wp_record_decode on exactly-sized heap copies
 * (ASan reports any read or write past them). Encoding 3 ("pages") inputs
 * are repaired at two depths (the header CRC over header + table only; or
 * also the table's block sizes and CRCs, so the LZ4 blocks are decoded), and
 * are also read from a memfd by record_read and record_read_page (page k
 * at random) with exactly-sized buffers: both must agree with
 * wp_record_decode. Exit 0: no report; a sanitizer report aborts
 * (exit != 0); 1: the decoder broke a rule below.
 * `make fuzz` runs it inside the test command; FUZZ_ITERATIONS overrides N.
 */
#define _GNU_SOURCE
#include "../src/record.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAX_INPUT (64 * 1024)

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static long pages_decoded, pages_refused; /* encoding-3 inputs that reached wp_record_decode */
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

struct seed {
    uint8_t *data;
    size_t len;
};

static const uint32_t edges[] = {0, 1, 4, 5, 15, 255, 4096, 4100, 65535, 1u << 20, (1u << 20) + 1, 0x7fffffff, 0x80000000, 0xffffffff};

static size_t mutate(uint8_t *b, size_t len, const struct seed *seeds, size_t nseeds)
{
    int ops = 1 + (int)(rnd() % 4);
    while (ops--) {
        switch (rnd() % 7) {
        case 0: /* flip a bit */
            if (len)
                b[rnd() % len] ^= (uint8_t)(1u << (rnd() % 8));
            break;
        case 1: /* set a byte */
            if (len)
                b[rnd() % len] = (uint8_t)rnd();
            break;
        case 2: { /* an edge value into a u32 (header fields, the lz4 length prefix) */
            if (len >= 4) {
                uint32_t v = edges[rnd() % (sizeof edges / sizeof edges[0])];
                size_t at = rnd() % 3 ? (rnd() % 10) * 4 : rnd() % (len - 3);
                if (at + 4 <= len)
                    memcpy(b + at, &v, 4);
            }
            break;
        }
        case 3: /* truncate */
            if (len)
                len = rnd() % (len + 1);
            break;
        case 4: { /* extend with random or zero bytes */
            size_t add = 1 + rnd() % 64;
            if (len + add <= MAX_INPUT) {
                bool zero = rnd() & 1;
                for (size_t i = 0; i < add; i++)
                    b[len + i] = zero ? 0 : (uint8_t)rnd();
                len += add;
            }
            break;
        }
        case 5: { /* splice in a run of another seed */
            const struct seed *s = &seeds[rnd() % nseeds];
            if (s->len && len) {
                size_t from = rnd() % s->len, to = rnd() % len, n = 1 + rnd() % 64;
                if (from + n > s->len)
                    n = s->len - from;
                if (to + n > len)
                    n = len - to;
                memcpy(b + to, s->data + from, n);
            }
            break;
        }
        case 6: /* change the encoding byte */
            if (len > 20)
                b[20] = (uint8_t)(rnd() % 5);
            break;
        }
    }
    return len;
}

/* Encoding 3: make the table's block sizes (each at most 4096, the last one
 * taking what is left) and CRCs agree with the payload, so blocks decode. */
static void repair_table(uint8_t *b, size_t len)
{
    uint32_t n;
    memcpy(&n, b + 16, 4);
    size_t table = (size_t)n * PAGES_ENTRY, at;
    if (n == 0 || n > WP_RECORD_PAGES_MAX_PAGES || RECORD_HEADER_BYTES + table > len)
        return;
    at = RECORD_HEADER_BYTES + table;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t bytes, crc;
        memcpy(&bytes, b + RECORD_HEADER_BYTES + (size_t)k * PAGES_ENTRY, 4);
        size_t left = len - at;
        if (bytes > left || k == n - 1)
            bytes = (uint32_t)(left < 4096 ? left : 4096);
        crc = record_crc32(0, b + at, bytes);
        memcpy(b + RECORD_HEADER_BYTES + (size_t)k * PAGES_ENTRY, &bytes, 4);
        memcpy(b + RECORD_HEADER_BYTES + (size_t)k * PAGES_ENTRY + 4, &crc, 4);
        at += bytes;
    }
}

/* Make stored bytes and CRC agree with the input, so the decoder runs
 * (encoding 3: the CRC covers header and table only). */
static void repair(uint8_t *b, size_t len)
{
    uint32_t stored = (uint32_t)(len - RECORD_HEADER_BYTES), crc, n;
    memcpy(b + 24, &stored, 4);
    memcpy(&n, b + 16, 4);
    uint64_t covered = stored;
    if (b[20] == RECORD_PAGES) {
        if (rnd() % 2)
            repair_table(b, len);
        covered = (uint64_t)n * PAGES_ENTRY < stored ? (uint64_t)n * PAGES_ENTRY : stored;
    }
    crc = record_crc32(record_crc32(0, b, 28), b + RECORD_HEADER_BYTES, covered);
    memcpy(b + 28, &crc, 4);
}

/* Encoding 3 through the file readers (record_read, record_read_page of a
 * random page k) with exactly-sized buffers: the same answer as
 * wp_record_decode gave (rc, why; on success the same pages). */
static int through_file(const wp_record_codec *codec, const uint8_t *h, const uint8_t *payload, uint32_t stored, uint32_t region,
                        uint64_t first, uint32_t count, int enc, uint32_t why, const uint8_t *pages)
{
    int fd = memfd_create("fuzz_record", MFD_CLOEXEC), bad = 0;
    if (fd < 0 || pwrite(fd, h, RECORD_HEADER_BYTES, 100) != RECORD_HEADER_BYTES ||
        (stored && pwrite(fd, payload, stored, 100 + RECORD_HEADER_BYTES) != (ssize_t)stored)) {
        perror("fuzz_record: memfd");
        exit(2);
    }
    size_t bytes = (size_t)count * 4096, scratch_cap = (size_t)count * PAGES_ENTRY + 4096;
    uint8_t *out = malloc(bytes), *scratch = malloc(scratch_cap), page[4096];
    uint32_t why2 = 0;
    int rc = record_read(codec, fd, false, 100, region, first, count, out, scratch, scratch_cap, &why2);
    if (rc != enc || (rc < 0 && why2 != why) || (rc >= 0 && memcmp(out, pages, bytes))) {
        fprintf(stderr, "fuzz_record: record_read %d why %u, decode %d why %u\n", rc, why2, enc, why);
        bad = 1;
    }
    uint32_t k = (uint32_t)(rnd() % count);
    bool whole = true;
    /* record_read_page reads the header and the table into its scratch: 32 bytes more, exactly. */
    uint8_t *page_scratch = malloc(RECORD_HEADER_BYTES + scratch_cap);
    rc = record_read_page(codec, fd, 100, region, first, count, k, page, page_scratch, RECORD_HEADER_BYTES + scratch_cap, &why2, &whole);
    free(page_scratch);
    /* A decodable record: every page decodes, to its bytes. A refused page: the record is refused too. */
    if ((enc >= 0 && (rc < 0 || (rc != RECORD_ZERO && memcmp(page, pages + (size_t)k * 4096, 4096)))) ||
        (rc < 0 && rc != -EBADMSG) || (rc == -EBADMSG && enc >= 0)) {
        fprintf(stderr, "fuzz_record: record_read_page(%u) %d why %u whole %d, decode %d why %u\n", k, rc, why2, whole, enc, why);
        bad = 1;
    }
    free(scratch);
    free(out);
    close(fd);
    return bad;
}

static int one(const wp_record_codec *codec, const uint8_t *in, size_t len)
{
    if (len < RECORD_HEADER_BYTES)
        return 0; /* callers always read 32 header bytes */
    uint8_t *h = malloc(RECORD_HEADER_BYTES);
    memcpy(h, in, RECORD_HEADER_BYTES);
    uint32_t region, count, out[2];
    uint64_t first;
    memcpy(&region, h + 4, 4);
    memcpy(&first, h + 8, 8);
    memcpy(&count, h + 16, 4);
    if (rnd() % 8 == 0) /* sometimes the index says something else */
        region ^= 1;
    int rc = wp_record_check(h, region, first, count, out);
    int bad = 0;
    if (rc == 0) {
        uint64_t bytes = (uint64_t)count * 4096;
        uint32_t stored = out[0];
        /* The bounds the check promises: what a caller then allocates. */
        uint64_t most = h[20] == RECORD_PAGES ? bytes + (uint64_t)count * PAGES_ENTRY : bytes + 1024;
        if (count == 0 || count > WP_RECORD_MAX_PAGES || stored > most || (h[20] == RECORD_LZ4 && bytes > 255ull * stored) ||
            (h[20] == RECORD_PAGES && count > WP_RECORD_PAGES_MAX_PAGES)) {
            fprintf(stderr, "fuzz_record: check accepted count %u stored %u encoding %u\n", count, stored, h[20]);
            bad = 1;
        }
        size_t have = len - RECORD_HEADER_BYTES;
        uint8_t *payload = malloc(stored ? stored : 1);
        memcpy(payload, in + RECORD_HEADER_BYTES, have < stored ? have : stored);
        if (have < stored)
            memset(payload + have, 0, stored - have);
        uint64_t out_bytes = h[20] == RECORD_LZ4 || h[20] == RECORD_PAGES ? bytes : 0;
        uint8_t *pages = malloc(out_bytes ? out_bytes : 1);
        uint32_t why = 0;
        int enc = wp_record_decode(codec, h, payload, stored, out_bytes ? pages : NULL, out_bytes, &why);
        if (enc != -EBADMSG && enc != h[20]) {
            fprintf(stderr, "fuzz_record: decode returned %d for encoding %u\n", enc, h[20]);
            bad = 1;
        }
        if (enc == -EBADMSG && (why == WP_RECORD_OK || why > WP_RECORD_BAD_PAYLOAD)) {
            fprintf(stderr, "fuzz_record: refused without a reason (%u)\n", why);
            bad = 1;
        }
        if (h[20] == RECORD_PAGES)
            *(enc >= 0 ? &pages_decoded : &pages_refused) += 1;
        if (h[20] == RECORD_PAGES)
            bad |= through_file(codec, h, payload, stored, region, first, count, enc, why, pages);
        free(pages);
        free(payload);
    } else if (rc != -EBADMSG || out[1] == WP_RECORD_OK) {
        fprintf(stderr, "fuzz_record: check returned %d, reason %u\n", rc, out[1]);
        bad = 1;
    }
    free(h);
    return bad;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: fuzz_record ITERATIONS SEED_FILE...\n");
        return 2;
    }
    long iterations = strtol(argv[1], NULL, 10);
    const char *env = getenv("FUZZ_ITERATIONS");
    if (env)
        iterations = strtol(env, NULL, 10);
    size_t nseeds = (size_t)(argc - 2);
    struct seed *seeds = calloc(nseeds, sizeof *seeds);
    for (size_t i = 0; i < nseeds; i++) {
        FILE *f = fopen(argv[i + 2], "rb");
        if (!f) {
            perror(argv[i + 2]);
            return 2;
        }
        seeds[i].data = malloc(MAX_INPUT);
        seeds[i].len = fread(seeds[i].data, 1, MAX_INPUT, f);
        fclose(f);
    }
    wp_record_codec *codec = wp_record_codec_create();
    uint8_t *b = malloc(MAX_INPUT + 64);
    long failures = 0, decoded = 0;
    for (size_t i = 0; i < nseeds; i++) /* every seed as it is must decode */
        if (one(codec, seeds[i].data, seeds[i].len))
            failures++;
    for (long it = 0; it < iterations; it++) {
        const struct seed *s = &seeds[rnd() % nseeds];
        memcpy(b, s->data, s->len);
        size_t len = mutate(b, s->len, seeds, nseeds);
        if (len >= RECORD_HEADER_BYTES && rnd() % 2) {
            repair(b, len);
            decoded++;
        }
        failures += one(codec, b, len);
    }
    wp_record_codec_destroy(codec);
    free(b);
    for (size_t i = 0; i < nseeds; i++)
        free(seeds[i].data);
    free(seeds);
    printf("fuzz_record: %ld iterations (%ld with stored bytes and CRC repaired) from %zu seeds, %ld failures; encoding 3: %ld decoded, %ld refused\n",
           iterations, decoded, nseeds, failures, pages_decoded, pages_refused);
    return failures ? 1 : 0;
}
