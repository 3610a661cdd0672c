#!/usr/bin/env python3
# CPU check of the lane/fragment index mapping of the decode expert kernels: hga_moe_gate_up_decode_v3 (8
# intermediate columns per block, 4 warps, gate rows as A rows g and up rows as A rows g + 8, k-permuted fragments,
# warp-cooperative group bytes), hga_moe_down_decode_v3 (16 output rows per block, 16 warps, a unit = (slot, k
# block) is one mma A tile: rows g / g + 8 = output rows n0 + g / n0 + g + 8, every B column the unit's activation),
# and the line coverage of gate/up's down-weight prefetch. Emulates mma.sync m16n8k32 from the PTX ISA fragment
# layout on small integers and compares with direct dot products. Pure Python, a few seconds; it checks the
# mapping, not the compiled code.
import random
def mma(a, b, c):  # a[lane][4] of 4-byte lists, b[lane][2] of 4-byte lists, c[lane][4]
    A = [[0]*32 for _ in range(16)]; B = [[0]*8 for _ in range(32)]
    for L in range(32):
        g, t = L // 4, L % 4
        for i in range(4):
            A[g][4*t+i] = a[L][0][i]; A[g+8][4*t+i] = a[L][1][i]
            A[g][16+4*t+i] = a[L][2][i]; A[g+8][16+4*t+i] = a[L][3][i]
            B[4*t+i][g] = b[L][0][i]; B[16+4*t+i][g] = b[L][1][i]
    out = []
    for L in range(32):
        g, t = L // 4, L % 4
        def C(r, col): return sum(A[r][k]*B[k][col] for k in range(32))
        out.append([c[L][0]+C(g,2*t), c[L][1]+C(g,2*t+1), c[L][2]+C(g+8,2*t), c[L][3]+C(g+8,2*t+1)])
    return out
def words(bs):  # 16 bytes -> 4 words (lists of 4 bytes)
    return [bs[4*i:4*i+4] for i in range(4)]
def chunk(ag, ag8, b, c):  # per lane lists of 4 words
    c = mma([[ag[L][0], ag8[L][0], ag[L][1], ag8[L][1]] for L in range(32)], [[b[L][0], b[L][1]] for L in range(32)], c)
    return mma([[ag[L][2], ag8[L][2], ag[L][3], ag8[L][3]] for L in range(32)], [[b[L][2], b[L][3]] for L in range(32)], c)
def quant(group):  # lane L -> bytes 4L..4L+4 (identity "quantization")
    return [group[4*L:4*L+4] for L in range(32)]
def frag(q):  # per lane: (lo words, hi words)
    lo, hi = [], []
    for L in range(32):
        t = L % 4; s = 4*t
        lo.append([q[s], q[s+1], q[s+2], q[s+3]]); hi.append([q[16+s], q[17+s], q[18+s], q[19+s]])
    return lo, hi
R = lambda n: [random.randrange(-8, 9) for _ in range(n)]

def gate_up(h, inter, E, k, T):
    wg = [[R(h) for _ in range(inter)] for _ in range(E)]; wu = [[R(h) for _ in range(inter)] for _ in range(E)]
    x = [R(h) for _ in range(T)]; ids = [random.randrange(E) for _ in range(T*k)]
    kbs = h // 128; WARPS, U = 4, 4
    out = {}
    for pair in range(T*k):
        token, e = pair // k, ids[pair]
        for bx in range(inter // 8):
            i0 = 8*bx; sm = {}
            for warp in range(WARPS):
                tg = [0]*32; tu = [0]*32
                kb0 = warp
                while kb0 < kbs:
                    for u in range(U):
                        kb = kb0 + WARPS*u
                        if kb >= kbs: continue
                        a = [[None]*4 for _ in range(32)]
                        for L in range(32):
                            g, t = L//4, L % 4
                            o = kb*128 + 16*t
                            a[L] = [words(wg[e][i0+g][o:o+16]), words(wg[e][i0+g][o+64:o+80]), words(wu[e][i0+g][o:o+16]), words(wu[e][i0+g][o+64:o+80])]
                        q = quant(x[token][kb*128:kb*128+128]); lo, hi = frag(q)
                        c = chunk([a[L][0] for L in range(32)], [a[L][2] for L in range(32)], lo, [[0]*4]*32)
                        c = chunk([a[L][1] for L in range(32)], [a[L][3] for L in range(32)], hi, c)
                        for L in range(32): tg[L] += c[L][0]; tu[L] += c[L][2]
                    kb0 += WARPS*U
                for L in range(32):
                    if L % 4 == 0: sm[(warp, L//4)] = (tg[L], tu[L])
            for tid in range(8):
                out[(pair, i0+tid)] = (sum(sm[(w, tid)][0] for w in range(WARPS)), sum(sm[(w, tid)][1] for w in range(WARPS)))
    bad = 0
    for (pair, i), (gv, uv) in out.items():
        token, e = pair // k, ids[pair]
        rg = sum(wg[e][i][j]*x[token][j] for j in range(h)); ru = sum(wu[e][i][j]*x[token][j] for j in range(h))
        bad += (rg != gv) + (ru != uv)
    print(f"gate_up h={h} I={inter} E={E} k={k} T={T}: {len(out)} outputs, {bad} wrong")
    return bad

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
bad = gate_up(128, 128, 3, 2, 1) + gate_up(640, 128, 2, 1, 2) + gate_up(2048, 128, 2, 1, 1)
bad += down_v3(128, 128, 3, 2, 1) + down_v3(128, 384, 3, 3, 2) + down_v3(128, 128, 5, 5, 1) + down_v3(128, 768, 9, 8, 1)
bad += down_v3(256, 256, 4, 9, 1)
bad += prefetch_cover(2048, 768) + prefetch_cover(128, 128) + prefetch_cover(640, 1152) + prefetch_cover(4096, 256)
raise SystemExit(1 if bad else 0)
