#!/usr/bin/env python3
# CPU check of the lane/fragment index mapping of hga_moe_gate_up_decode / hga_moe_down_decode (version 2):
# emulates mma.sync m16n8k32 from the PTX ISA fragment layout, runs the kernels' per-lane logic (k-permuted
# fragments, warp-cooperative group bytes, gate/up interleave, down's two-unit B columns) on small integers and
# compares with direct dot products. Pure Python, a few seconds. It checks the mapping, not the compiled code.
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

def down(h, inter, E, k, T):
    wd = [[R(inter) for _ in range(h)] for _ in range(E)]
    act = [R(inter) for _ in range(T*k)]; ids = [random.randrange(E) for _ in range(T*k)]; rw = [random.randrange(1, 4) for _ in range(T*k)]
    kbs = inter // 128; WARPS, U = 8, 3; units = k*kbs; pairs = (units+1)//2
    out = {}
    for token in range(T):
        for bx in range(h // 8):
            n0 = 8*bx; sm = {}
            for warp in range(WARPS):
                tot = [0]*32; p0 = warp
                while p0 < pairs:
                    for u in range(U):
                        pr = p0 + WARPS*u
                        if pr >= pairs: continue
                        A = []; Q = []; F = []
                        for j in range(2):
                            unit = 2*pr + j
                            if unit < units:
                                s, kb = unit // kbs, unit % kbs; e = ids[token*k+s]
                                A.append([[words(wd[e][n0+L//4][kb*128+16*(L%4):kb*128+16*(L%4)+16]), words(wd[e][n0+L//4][kb*128+64+16*(L%4):kb*128+80+16*(L%4)])] for L in range(32)])
                                Q.append(quant(act[token*k+s][kb*128:kb*128+128])); F.append(rw[token*k+s])
                            else:
                                A.append([[[[0]*4]*4, [[0]*4]*4] for L in range(32)]); Q.append([[0]*4]*32); F.append(0)
                        b0 = frag(Q[0]); b1 = frag(Q[1])
                        lo = [b1[0][L] if L//4 == 1 else b0[0][L] for L in range(32)]
                        hi = [b1[1][L] if L//4 == 1 else b0[1][L] for L in range(32)]
                        c = chunk([A[0][L][0] for L in range(32)], [A[1][L][0] for L in range(32)], lo, [[0]*4]*32)
                        c = chunk([A[0][L][1] for L in range(32)], [A[1][L][1] for L in range(32)], hi, c)
                        for L in range(32): tot[L] += c[L][0]*F[0] + c[L][3]*F[1]
                    p0 += WARPS*U
                for L in range(32):
                    if L % 4 == 0: sm[(warp, L//4)] = tot[L]
            for tid in range(8):
                out[(token, n0+tid)] = sum(sm[(w, tid)] for w in range(WARPS))
    bad = 0
    for (token, n), v in out.items():
        r = sum(rw[token*k+s]*sum(wd[ids[token*k+s]][n][j]*act[token*k+s][j] for j in range(inter)) for s in range(k))
        bad += r != v
    print(f"down h={h} I={inter} E={E} k={k} T={T}: {len(out)} outputs, {bad} wrong")

random.seed(1)
gate_up(128, 128, 3, 2, 1); gate_up(640, 128, 2, 1, 2); gate_up(2048, 128, 2, 1, 1)
down(128, 128, 3, 2, 1); down(128, 384, 3, 3, 2); down(128, 128, 5, 5, 1); down(128, 768, 9, 8, 1)
