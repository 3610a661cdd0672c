//! Programmatic dependent launch (PDL) needs every kernel to wait for its predecessor before touching memory
//! (gpu-kernels/src/arch/pdl.rs). CPU checks of the committed PTX (what CI embeds without a kernel toolchain, and
//! what `HGA_UPDATE_PTX=1 cargo build` refreshes): in the sm_90 and sm_120 images every `.entry` executes
//! `griddepcontrol.wait` before its first global load / store / `cp.async` / atomic / reduction (textual order),
//! except the L2 prefetches marked `pdl-early-constant` (decode FP8 linear, lm_head, the decode router, the two
//! RMSNorm kernels and q/k norm + RoPE: constant weights asked for while the previous kernel finishes), and the
//! `pdl-early-kv` ones of the decode attention (the first K/V tiles of each split);
//! the sm_89 image has no `griddepcontrol` at all (it is launched without PDL, also on an sm_90 device through the
//! driver JIT). Also the checker itself, on small texts, and what the embedded images record.
use hga::runtime::{ptx_pdl_check, ImageKind};

fn committed(arch: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("gpu-kernels/ptx").join(format!("{arch}.ptx"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn entries(ptx: &str) -> usize {
    ptx.lines().filter(|l| l.split("//").next().unwrap_or("").contains(".entry ")).count()
}

#[test]
fn pdl_images_wait_before_any_global_access() {
    for arch in ["sm_90", "sm_120"] {
        let ptx = committed(arch);
        let n = entries(&ptx);
        assert!(n >= 30, "{arch}: only {n} entries found");
        let checked = ptx_pdl_check(&ptx).unwrap_or_else(|e| panic!("{arch}.ptx: {e}"));
        assert_eq!(checked, n, "{arch}: every entry checked");
        // One wait and one launch_dependents per entry (the shared prologue).
        assert_eq!(ptx.matches("griddepcontrol.wait;").count(), n, "{arch}: one wait per entry");
        assert_eq!(ptx.matches("griddepcontrol.launch_dependents;").count(), n, "{arch}: one trigger per entry");
        // The early weight prefetches are where they are meant to be, and only there.
        for (name, early) in early_loads_per_entry(&ptx) {
            let want = matches!(
                name.as_str(),
                "hga_fp8_linear_decode"
                    | "hga_lm_head"
                    | "hga_moe_router_rows"
                    | "hga_rmsnorm"
                    | "hga_rmsnorm_fp8_quant"
                    | "hga_qk_norm_rope"
                    | "hga_attention_decode_v3_s3"
            );
            assert_eq!(early > 0, want, "{arch} {name}: {early} instructions marked pdl-early-*");
        }
    }
}

/// (entry name, number of `pdl-early-constant` / `pdl-early-kv` prefetches in it) for every entry.
fn early_loads_per_entry(ptx: &str) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for l in ptx.lines() {
        if let Some((_, rest)) = l.split("//").next().unwrap_or("").split_once(".entry ") {
            out.push((rest.split('(').next().unwrap_or("").trim().to_string(), 0));
        } else if l.contains("// pdl-early-constant") || l.contains("// pdl-early-kv") {
            let last = out.last_mut().expect("a marked prefetch outside an entry");
            assert!(l.trim_start().starts_with("prefetch.global.L2 "), "marked: {l}");
            last.1 += 1;
        }
    }
    out
}

#[test]
fn sm_89_image_has_no_griddepcontrol() {
    let ptx = committed("sm_89");
    assert!(!ptx.contains("griddepcontrol"), "sm_89.ptx must not contain griddepcontrol (sm_90+ only)");
    assert!(ptx_pdl_check(&ptx).is_err());
}

#[test]
fn embedded_images_record_pdl_for_sm_90_and_sm_120_only() {
    let imgs = hga::embedded_images();
    assert!(imgs.iter().any(|i| i.kind == ImageKind::Ptx && i.sm == 90));
    for i in &imgs {
        assert_eq!(i.pdl, i.sm >= 90, "{}: pdl = {}", i.name(), i.pdl);
    }
    // An image read from bytes: PTX is read, a cubin cannot be and is never PDL.
    let ptx = committed("sm_90").into_bytes();
    assert!(hga::runtime::KernelImage::from_bytes(ptx, ImageKind::Ptx, "x").unwrap().pdl);
    let ptx = committed("sm_89").into_bytes();
    assert!(!hga::runtime::KernelImage::from_bytes(ptx, ImageKind::Ptx, "x").unwrap().pdl);
    assert!(!hga::runtime::KernelImage::from_bytes(vec![0x7f], ImageKind::Cubin, "k.sm_90.cubin").unwrap().pdl);
}

#[test]
fn checker_catches_accesses_before_the_wait() {
    let entry = |body: &str| {
        format!(
            ".version 8.5\n.target sm_90\n.visible .entry k(\n\t.param .align 8 .b8 k_param_0[8]\n)\n{{\n\t.reg .b64 \
             %rd<4>;\n{body}\n\tret;\n}}\n"
        )
    };
    let ok = entry(
        "\tld.param.b64 %rd1, [k_param_0];\n\tmov.u32 %r1, %tid.x;\n\t// begin inline asm\n\tgriddepcontrol.wait;\n\t\
         // end inline asm\n\tld.global.u32 %r2, [%rd1];",
    );
    assert_eq!(ptx_pdl_check(&ok), Ok(1));
    // Marked constant-weight prefetches may come first; unmarked ones, or a marked load, may not.
    let early = "\tprefetch.global.L2 [%rd1]; // pdl-early-constant";
    assert_eq!(ptx_pdl_check(&entry(&format!("{early}\n\tgriddepcontrol.wait;"))), Ok(1));
    for bad in
        ["\tprefetch.global.L2 [%rd1];", "\tld.global.nc.v4.u32 {%r1, %r2, %r3, %r4}, [%rd1]; // pdl-early-constant"]
    {
        assert!(ptx_pdl_check(&entry(&format!("{bad}\n\tgriddepcontrol.wait;"))).is_err(), "{bad}");
    }
    // Shared and local memory before the wait are fine; two entries are each checked.
    let shared = entry("\tst.shared.u32 [%r1], %r1;\n\tld.shared::cta.u32 %r2, [%r1];\n\tgriddepcontrol.wait;");
    assert_eq!(ptx_pdl_check(&format!("{ok}{shared}")), Ok(2));
    for bad in [
        "\tld.global.nc.v4.u32 {%r1, %r2, %r3, %r4}, [%rd1];",
        "\t@%p1 st.global.u32 [%rd1], %r1;",
        "\tld.u32 %r1, [%rd1];",
        "$L__BB0_1:\n\tatom.global.add.u32 %r1, [%rd1], 1;",
        "\tred.global.add.f32 [%rd1], %f1;",
        "\tcp.async.cg.shared.global [%r1], [%rd1], 16;",
        "\t{ .reg .pred p; ld.volatile.global.u32 %r1, [%rd1]; }",
    ] {
        let e = ptx_pdl_check(&entry(&format!("{bad}\n\tgriddepcontrol.wait;"))).unwrap_err();
        assert!(e.starts_with("k: `"), "{bad}: {e}");
    }
    assert_eq!(ptx_pdl_check(&entry("\tret;")), Err("k: no griddepcontrol.wait".into()));
    assert!(ptx_pdl_check(".version 8.5\n").is_err());
    // A second entry that lacks the wait is found after a good one.
    let e =
        ptx_pdl_check(&format!("{ok}{}", entry("\tld.global.u32 %r2, [%rd1];").replace(" k(", " k2("))).unwrap_err();
    assert!(e.starts_with("k2: "), "{e}");
}
