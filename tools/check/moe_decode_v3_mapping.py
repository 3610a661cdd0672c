#!/usr/bin/env python3
# CPU check of the lane/fragment index mapping of hga_moe_down_decode_v3 (16 output rows per block, 16 warps,
# a unit = (slot, k block) is one mma A tile: rows g / g + 8 = output rows n0 + g / n0 + g + 8, every B column the
# unit's activation), and of the line coverage of gate/up v3's down-weight prefetch. Reuses the mma emulation of
# moe_decode_v2_mapping.py (same k-permuted fragments). Pure Python; it checks the mapping, not the compiled code.
import os, random
src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_decode_v2_mapping.py")).read()
exec(src[:src.index("random.seed(1)")])

def down_v3(h, inter, E, k, T):
    wd = [[R(inter) for _ in range(h)] for _ in range(E)]
    act = [R(inter) for _ in range(T*k)]; ids = [random.randrange(E) for _ in range(T*k)]; rw = [random.randrange(1, 4) for _ in range(T*k)]
    kbs = inter // 128; WARPS, U, ROWS = 16, 3, 16; units = k*kbs
    out = {}
    for token in range(T):
        for bx in range(h // ROWS):
            n0 = ROWS*bx; sm = {}
            for warp in range(WARPS):
                tg = [0]*32; tg8 = [0]*32; u0 = warp
                while u0 < units:
                    for u in range(U):
                        unit = u0 + WARPS*u
                        if unit >= units: continue
                        s, kb = unit // kbs, unit % kbs; e = ids[token*k+s]; f = rw[token*k+s]
                        def w16(row, off, L): return words(wd[e][row][kb*128+off+16*(L%4):kb*128+off+16*(L%4)+16])
                        a = [[w16(n0+L//4, 0, L), w16(n0+L//4, 64, L), w16(n0+L//4+8, 0, L), w16(n0+L//4+8, 64, L)] for L in range(32)]
                        lo, hi = frag(quant(act[token*k+s][kb*128:kb*128+128]))
                        c = chunk([a[L][0] for L in range(32)], [a[L][2] for L in range(32)], lo, [[0]*4]*32)
                        c = chunk([a[L][1] for L in range(32)], [a[L][3] for L in range(32)], hi, c)
                        for L in range(32): tg[L] += c[L][0]*f; tg8[L] += c[L][2]*f
                    u0 += WARPS*U
                for L in range(32):
                    if L % 4 == 0: sm[(warp, L//4)] = tg[L]; sm[(warp, L//4+8)] = tg8[L]
            for tid in range(ROWS):
                out[(token, n0+tid)] = sum(sm[(w, tid)] for w in range(WARPS))
    bad = 0
    for (token, n), v in out.items():
        r = sum(rw[token*k+s]*sum(wd[ids[token*k+s]][n][j]*act[token*k+s][j] for j in range(inter)) for s in range(k))
        bad += r != v
    print(f"down_v3 h={h} I={inter} E={E} k={k} T={T}: {len(out)} outputs, {bad} wrong")
    return bad

def prefetch_cover(h, inter):
    lines = h // 16; seen = []
    for bx in range(inter // 8):
        for tid in range(128):
            l = tid
            while l < lines: seen.append(bx*lines + l); l += 128
    ok = sorted(seen) == list(range(h*inter // 128))
    print(f"prefetch h={h} I={inter}: {len(seen)} lines, {'exact cover' if ok else 'WRONG'}")
    return 0 if ok else 1

random.seed(1)
bad = down_v3(128, 128, 3, 2, 1) + down_v3(128, 384, 3, 3, 2) + down_v3(128, 128, 5, 5, 1) + down_v3(128, 768, 9, 8, 1)
bad += down_v3(256, 256, 4, 9, 1)
bad += prefetch_cover(2048, 768) + prefetch_cover(128, 128) + prefetch_cover(640, 1152) + prefetch_cover(4096, 256)
raise SystemExit(1 if bad else 0)
