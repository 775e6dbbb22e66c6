/* A transaction's page diff (aiodbenv/txn/batch.py's `diff`, compiled): the ranges where
   `new_` differs from `old` (both n bytes), in whole chunks of `chunk` bytes (the last one may
   be shorter), adjacent differing chunks merged. Writes range k as out[2k] = start,
   out[2k+1] = end; returns the number of ranges, or -1 if there are more than `max` (out
   holds 2*max words). It reads the two buffers only: the caller holds the page's latch, so
   neither changes under it. */
int aiodb_txn_diff(const unsigned char *old, const unsigned char *new_, uint64_t n,
                   uint64_t chunk, uint32_t *out, int max) {
    int k = 0;
    uint64_t i = 0;
    if (chunk == 0 || n > UINT32_MAX) return -1;
    while (i < n) {
        uint64_t len = chunk < n - i ? chunk : n - i;
        if (memcmp(old + i, new_ + i, len) == 0) { i += len; continue; }
        uint64_t start = i;
        i += len;
        while (i < n) {
            len = chunk < n - i ? chunk : n - i;
            if (memcmp(old + i, new_ + i, len) == 0) break;
            i += len;
        }
        if (k == max) return -1;
        out[2 * k] = (uint32_t)start;
        out[2 * k + 1] = (uint32_t)i;
        k++;
    }
    return k;
}
