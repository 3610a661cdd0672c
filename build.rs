//! Builds the GPU kernels (crate `gpu-kernels`) to PTX for sm_89 and sm_90 (PTX ISA 8.5) and sm_120 (PTX 8.7) with
//! rustc's `nvptx64-nvidia-cuda` target, assembles cubins when ptxas is present, and embeds every image in the `hga`
//! crate (`$OUT_DIR/kernel_images.rs`, included by `src/kernels.rs`).
//!
//! The kernel toolchain (a rustc that can build `core` for nvptx: std source + `llvm-bitcode-linker`) is found
//! through the environment (`HGA_NVPTX_RUSTC`, `HGA_NVPTX_CARGO`, `HGA_NVPTX_PATH`, `HGA_PTXAS`) or the file
//! `.toolchain/env` that `scripts/setup-toolchain` writes. Without one, the committed `gpu-kernels/ptx/*.ptx` are
//! embedded instead (a cargo warning says so), so stable Rust alone builds and tests the crate.
//! `HGA_KERNELS=committed` forces the committed PTX; `HGA_UPDATE_PTX=1` copies fresh PTX over the committed files.
use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (arch, extra target features, programmatic dependent launch). PTX 8.5 is needed for FP8 mma on sm_89/sm_90;
/// sm_120's default is 8.7. With PDL the kernels are built with `--cfg hga_pdl`: every entry point starts with
/// `griddepcontrol.wait` (sm_90+, gpu-kernels/src/arch/pdl.rs), and the image is recorded as PDL-ready in the index
/// (the host launches its kernels with the programmatic-serialization attribute only then).
const ARCHES: [(&str, &str, bool); 3] = [("sm_89", "+ptx85", false), ("sm_90", "+ptx85", true), ("sm_120", "", true)];

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    for p in ["gpu-kernels/src", "gpu-kernels/Cargo.toml", "gpu-kernels/ptx", ".toolchain/env"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    for v in ["HGA_NVPTX_RUSTC", "HGA_NVPTX_CARGO", "HGA_NVPTX_PATH", "HGA_PTXAS", "HGA_KERNELS", "HGA_UPDATE_PTX"] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let tc = Toolchain::find(&root);
    let mut images: Vec<(String, &'static str, PathBuf, bool)> = Vec::new(); // (arch, kind, file, pdl)
    let fresh = match (&tc, env::var("HGA_KERNELS").as_deref()) {
        (_, Ok("committed")) => {
            println!("cargo:warning=HGA_KERNELS=committed: embedding the committed gpu-kernels/ptx/*.ptx");
            false
        }
        (Some(tc), _) => match build_all(&root, &out, tc, &mut images) {
            Ok(()) => true,
            Err(e) => panic!("kernel build failed: {e}"),
        },
        (None, _) => {
            println!(
                "cargo:warning=no nvptx-capable Rust toolchain found (run scripts/setup-toolchain): embedding the \
                 committed gpu-kernels/ptx/*.ptx; kernel source changes are NOT in this build"
            );
            false
        }
    };
    if !fresh {
        images.clear();
        for (arch, _, pdl) in ARCHES {
            let p = root.join("gpu-kernels/ptx").join(format!("{arch}.ptx"));
            assert!(p.exists(), "missing committed PTX {}", p.display());
            images.push((arch.to_string(), "ptx", p, pdl));
        }
    }
    write_index(&out, &images, fresh);
}

struct Toolchain {
    rustc: String,
    cargo: String,
    path: String,
    ptxas: Option<String>,
}

impl Toolchain {
    fn find(root: &Path) -> Option<Toolchain> {
        let mut vars: BTreeMap<String, String> = BTreeMap::new();
        if let Ok(text) = fs::read_to_string(root.join(".toolchain/env")) {
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                if let Some((k, v)) = line.split_once('=') {
                    vars.insert(k.trim().to_string(), v.trim().to_string());
                }
            }
        }
        let get = |k: &str| env::var(k).ok().or_else(|| vars.get(k).cloned()).filter(|v| !v.is_empty());
        let rustc = get("HGA_NVPTX_RUSTC")?;
        let cargo = get("HGA_NVPTX_CARGO")?;
        if !Path::new(&rustc).exists() || !Path::new(&cargo).exists() {
            return None;
        }
        Some(Toolchain {
            rustc,
            cargo,
            path: get("HGA_NVPTX_PATH").unwrap_or_default(),
            ptxas: get("HGA_PTXAS").filter(|p| Path::new(p).exists()),
        })
    }
}

fn build_all(
    root: &Path,
    out: &Path,
    tc: &Toolchain,
    images: &mut Vec<(String, &'static str, PathBuf, bool)>,
) -> Result<(), String> {
    let target_root = env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    // One kernel target dir per source tree: worktrees sharing a CARGO_TARGET_DIR would otherwise overwrite each
    // other's `gpu_kernels.ptx` between the kernel build and the copy below (seen: another worktree's kernels
    // embedded and copied over gpu-kernels/ptx).
    let tree = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        root.hash(&mut h);
        format!("{:016x}", h.finish())
    };
    let update = env::var("HGA_UPDATE_PTX").as_deref() == Ok("1");
    for (arch, feat, pdl) in ARCHES {
        let tdir = target_root.join("kernels").join(&tree).join(arch);
        let mut flags = format!("-C target-cpu={arch}");
        if !feat.is_empty() {
            flags += &format!(" -C target-feature={feat}");
        }
        if pdl {
            flags += " --cfg hga_pdl";
        }
        let mut cmd = Command::new(&tc.cargo);
        // The outer cargo's variables must not leak into the kernel build (target, flags, clippy wrapper, jobserver).
        for (k, _) in env::vars() {
            if k.starts_with("CARGO_") || k.starts_with("RUSTC") || k == "RUSTFLAGS" || k == "RUSTDOCFLAGS" {
                cmd.env_remove(&k);
            }
        }
        let path = format!("{}:{}", tc.path, env::var("PATH").unwrap_or_default());
        cmd.current_dir(root.join("gpu-kernels"))
            .env("PATH", path)
            .env("RUSTC", &tc.rustc)
            .env("RUSTC_BOOTSTRAP", "1")
            .env("RUSTFLAGS", flags)
            .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
            .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
            .env("CARGO_PROFILE_RELEASE_LTO", "fat")
            .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
            .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "3")
            .args(["rustc", "--quiet", "--release", "--crate-type", "cdylib", "--target", "nvptx64-nvidia-cuda"])
            .args(["-Zbuild-std=core", "--target-dir"])
            .arg(&tdir);
        let st = cmd.output().map_err(|e| format!("running {}: {e}", tc.cargo))?;
        if !st.status.success() {
            return Err(format!(
                "kernel build for {arch} failed:\n{}\n{}",
                String::from_utf8_lossy(&st.stdout),
                String::from_utf8_lossy(&st.stderr)
            ));
        }
        let built = tdir.join("nvptx64-nvidia-cuda/release/gpu_kernels.ptx");
        let ptx = out.join(format!("{arch}.ptx"));
        fs::copy(&built, &ptx).map_err(|e| format!("copying {}: {e}", built.display()))?;
        images.push((arch.to_string(), "ptx", ptx.clone(), pdl));
        let committed = root.join("gpu-kernels/ptx").join(format!("{arch}.ptx"));
        if update {
            fs::create_dir_all(committed.parent().unwrap()).map_err(|e| e.to_string())?;
            fs::copy(&ptx, &committed).map_err(|e| e.to_string())?;
        } else if fs::read(&committed).ok() != fs::read(&ptx).ok() {
            println!(
                "cargo:warning=gpu-kernels/ptx/{arch}.ptx differs from the fresh build: run `HGA_UPDATE_PTX=1 cargo build`"
            );
        }
        if let Some(ptxas) = &tc.ptxas {
            let cubin = out.join(format!("{arch}.cubin"));
            let st = Command::new(ptxas)
                .arg(format!("-arch={arch}"))
                .arg(&ptx)
                .arg("-o")
                .arg(&cubin)
                .output()
                .map_err(|e| format!("running {ptxas}: {e}"))?;
            if !st.status.success() {
                return Err(format!("ptxas {arch} failed:\n{}", String::from_utf8_lossy(&st.stderr)));
            }
            images.push((arch.to_string(), "cubin", cubin, pdl));
        }
    }
    Ok(())
}

fn write_index(out: &Path, images: &[(String, &'static str, PathBuf, bool)], fresh: bool) {
    let mut s = String::from("// Generated by build.rs.\n");
    s += &format!("/// True when the images were built from the kernel sources in this build (false: the committed PTX).\npub const FRESH: bool = {fresh};\n");
    s +=
        "/// (sm number, image kind, bytes, built for programmatic dependent launch) of every embedded kernel image.\n\
          pub static IMAGES: &[(u32, ImageKind, &[u8], bool)] = &[\n";
    for (arch, kind, path, pdl) in images {
        let sm: u32 = arch.trim_start_matches("sm_").parse().unwrap();
        let k = if *kind == "ptx" { "Ptx" } else { "Cubin" };
        s += &format!("    ({sm}, ImageKind::{k}, include_bytes!({:?}), {pdl}),\n", path.display().to_string());
    }
    s += "];\n";
    fs::write(out.join("kernel_images.rs"), s).unwrap();
}
