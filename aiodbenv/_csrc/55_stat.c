/* The pool statistics' walk over every bucket of one cache (aiodbenv/mpool/statwalk.py).

Counting the pinned buffers means visiting every chain under its bucket mutex; in Python that
is tens of milliseconds for a large cache, all of it on the event loop. Here it is one call.

aiodb_stat_walk visits buckets first .. nb-1 of the cache at w. For each bucket it adds its
dirty count and its mutex's waits/nowaits to sums[0..2]; for each bucket holding buffers it
try-locks the mutex, walks the chain (every offset checked, the walk bounded by the bucket's
count) and appends (file slot, pgno, ref, pinned_at) for each pinned buffer of a file to out
(4 words each, at most cap entries). It stops early, returning the bucket to resume from:
  - a bucket whose mutex the try failed (*rc = -EBUSY: held by someone; -EOWNERDEAD: its
    holder died and the mutex IS now held by the caller, who must repair it) — Python visits
    that bucket itself, with a bounded wait and its repair path, then calls again past it;
  - out is too full for the bucket's chain (*rc = 0);
and returns nb when every bucket was visited. *n gets the entries written, AIODB_CORRUPT in *rc
for a chain that fails its checks. Only try-locks: this runs on the event loop. */

int64_t aiodb_stat_walk(uint64_t *w, void **mutexes, const uint64_t *nowait_w,
                        const uint64_t *bucket_w, uint64_t nb, uint64_t first, uint64_t *out,
                        uint64_t cap, uint64_t *n, uint64_t *sums, int64_t *rc) {
    uint64_t nbytes = region_bytes(w), words = nbytes / 8, got = 0;
    *rc = 0;
    uint64_t b = first;
    for (; b < nb; b++) {
        uint64_t bw = bucket_w[b];
        if (bw + L[L_B_COUNT] >= words || bw + L[L_B_HEAD] >= words || bw + L[L_B_DIRTY] >= words || nowait_w[b] >= words
            || nowait_w[b] < L[L_WAITS_FROM_NOWAITS]) {
            *rc = AIODB_CORRUPT;
            break;
        }
        uint64_t count = w[bw + L[L_B_COUNT]];
        if (count) {
            if (count > cap - got) {
                if (got == 0) *rc = AIODB_CORRUPT;  /* a count no out array could hold */
                break;
            }
            int64_t r = try_lock(w, mutexes[b], nowait_w[b]);
            if (r) { *rc = r; break; }
            uint64_t off = w[bw + L[L_B_HEAD]], left = count;
            while (off && left) {
                if (!bh_ok(off, nbytes)) { off = (uint64_t)AIODB_CORRUPT; break; }
                uint64_t x = off >> 3, ref = w[x + L[L_H_REF]], file = w[x + L[L_H_FILE]];
                if (ref && file) {
                    uint64_t *e = out + 4 * got++;
                    e[0] = file - 1;
                    e[1] = w[x + L[L_H_PGNO]];
                    e[2] = ref;
                    e[3] = w[x + L[L_H_PINAT]];
                }
                off = w[x + L[L_H_NEXT]];
                left--;
            }
            unlock(mutexes[b]);
            if (off == (uint64_t)AIODB_CORRUPT) { *rc = AIODB_CORRUPT; break; }
        }
        /* Counted after the walk, so a bucket handed back to Python is not counted twice. */
        sums[0] += w[bw + L[L_B_DIRTY]];
        sums[1] += w[nowait_w[b] - L[L_WAITS_FROM_NOWAITS]];
        sums[2] += w[nowait_w[b]];
    }
    *n = got;
    return (int64_t)b;
}

/* Add each registry slot's pins in the nb buckets of the cache at w to sums[0 .. MAX_PROCS):
   Pool.slot_pins (aiodbenv/mpool/handle.py), for env.stat() and the metrics. Unlocked, as its
   Python twin: an offset that fails its check (a chain changing under us, or a corrupt one)
   ends that bucket's walk, and a figure may be a pin off while pins change. Only buffers whose
   ref (the sum of their slots' counts) is not 0 are looked into. */
void aiodb_slot_pins(uint64_t *w, const uint64_t *bucket_w, uint64_t nb, uint64_t *sums) {
    uint64_t nbytes = region_bytes(w), words = nbytes / 8;
    uint64_t most = nbytes / L[L_BH_DATA] + 1;
    for (uint64_t b = 0; b < nb; b++) {
        uint64_t bw = bucket_w[b];
        if (bw + L[L_B_HEAD] >= words) return;
        uint64_t off = w[bw + L[L_B_HEAD]], walked = 0;
        while (off && walked++ < most) {
            if (!bh_ok(off, nbytes)) break;
            uint64_t x = off >> 3;
            if (w[x + L[L_H_REF]]) {
                const uint16_t *pins = (const uint16_t *)(w + x + L[L_H_PINS]);
                for (uint64_t s = 0; s < L[L_MAX_PROCS]; s++) sums[s] += pins[s];
            }
            off = w[x + L[L_H_NEXT]];
        }
    }
}
