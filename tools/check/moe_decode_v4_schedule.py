#!/usr/bin/env python3
# CPU check of hga_moe_decode_v4's work schedule (gpu-kernels/src/moe/decode_v4.rs), on integers, for many grid
# sizes G and shapes: every router row, gate/up unit and down unit is done exactly once; the down phase's virtual
# warps run exactly version 3's (warp, unit) rounds; the L2 prefetch lines cover the next gate/up unit and the
# block's first down unit exactly once; and the phases finish (no deadlock) when blocks advance in an adversarial
# order (a block that must wait is skipped; any step of any runnable agent is allowed), with the counters back at
# zero at the end. Pure Python; it checks the index logic as written here, not the compiled code.
import random

def schedule(G, T, H, I, E, k):
    WARPS, GROUPS, DWARPS, DU = 8, 2, 16, 3
    cols, kbs, dkbs = I // 8, H // 128, I // 128
    n_gu, slots, hb = T * k * cols, G * GROUPS, H // 16
    n_dn, units = T * hb, k * dkbs
    # Router rows: block b takes b, b + G, ...
    rows = [ex for b in range(G) for ex in range(b, E, G)]
    assert sorted(rows) == list(range(E))
    # Gate/up: group r of block b is slot (G - 1 - b) + G r, units s, s + slots, ...
    gu = {}
    for b in range(G):
        for r in range(GROUPS):
            s = (G - 1 - b) + G * r
            gu[(b, r)] = list(range(s, n_gu, slots))
    assert sorted(j for v in gu.values() for j in v) == list(range(n_gu))
    # Down: block b takes b, b + G, ...; warp w plays v3 warps w, w + 8: rounds u0 = vw, vw + 48, ...
    dn = {b: list(range(b, n_dn, G)) for b in range(G)}
    assert sorted(d for v in dn.values() for d in v) == list(range(n_dn))
    for w in range(WARPS):
        for v in range(2):
            vw = w + WARPS * v
            got = [u0 + DWARPS * u for u0 in range(vw, units, DWARPS * DU) for u in range(DU) if u0 + DWARPS * u < units]
            assert got == [u for u in range(units) if u % DWARPS == vw]  # version 3's units of warp vw, in order
    # Prefetch lines: next gate/up unit (16 rows x kbs lines over 128 threads), first down unit (k x 16 x dkbs
    # lines over the 2 groups' 256 threads).
    lines = [l for t in range(128) for l in range(t, 16 * kbs, 128)]
    assert sorted((l // kbs, l % kbs) for l in lines) == [(r, kb) for r in range(16) for kb in range(kbs)]
    lines = [l for g in range(2) for t in range(128) for l in range(t + 128 * g, k * 16 * dkbs, 256)]
    assert sorted((l // (16 * dkbs), (l // dkbs) % 16, l % dkbs) for l in lines) == \
        [(s, r, kb) for s in range(k) for r in range(16) for kb in range(dkbs)]
    # Progress under an adversarial order. Agents: per block, its router rows, then (after the router count) its
    # two gate/up groups and then its down units (a down round needs ready[pair] == cols for its slots).
    sync = [0, 0] + [0] * (T * k)
    state = {b: {"router": len(range(b, E, G)), "gu": {r: list(gu[(b, r)]) for r in range(GROUPS)}, "done": False}
             for b in range(G)}
    dn_rounds = {b: [(d, vw, u0) for d in dn[b] for vw in range(DWARPS) for u0 in range(vw, units, DWARPS * DU)]
                 for b in range(G)}
    for _ in range(10 ** 7):
        runnable = []
        for b in range(G):
            st = state[b]
            if st["done"]:
                continue
            if st["router"] > 0:
                runnable.append((b, "router"))
            elif sync[0] < E:
                continue  # waits for the router count
            elif any(st["gu"][r] for r in range(GROUPS)):
                runnable += [(b, ("gu", r)) for r in range(GROUPS) if st["gu"][r]]
            elif dn_rounds[b]:
                d, vw, u0 = dn_rounds[b][0]
                token = d // hb
                need = [(u0 + DWARPS * u) // dkbs for u in range(DU) if u0 + DWARPS * u < units]
                if all(sync[2 + token * k + s] == cols for s in need):
                    runnable.append((b, "dn"))
            else:
                runnable.append((b, "end"))
        if not runnable:
            break
        b, what = random.choice(runnable)
        st = state[b]
        if what == "router":
            st["router"] = 0
            sync[0] += len(range(b, E, G))
        elif what == "dn":
            dn_rounds[b].pop(0)
        elif what == "end":
            st["done"] = True
            sync[1] += 1
            if sync[1] == G:  # last block: resets
                sync = [0] * len(sync)
        else:
            j = st["gu"][what[1]].pop(0)
            sync[2 + j // cols] += 1
    assert all(state[b]["done"] for b in range(G)), f"deadlock G={G} T={T} H={H} I={I} E={E} k={k}"
    assert sync == [0] * len(sync)

random.seed(4)
cases = 0
for G in [1, 2, 3, 7, 64, 127, 128, 132, 133, 264]:
    for (T, H, I, E, k) in [(1, 2048, 768, 128, 8), (4, 2048, 768, 128, 8), (1, 128, 128, 1, 1), (3, 384, 256, 33, 5),
                            (2, 640, 1152, 32, 32), (4, 256, 384, 256, 16)]:
        schedule(G, T, H, I, E, k)
        cases += 1
print(f"moe_decode_v4_schedule: {cases} cases ok (coverage, v3 rounds, prefetch lines, progress, reset)")
