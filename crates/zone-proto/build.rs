//! Compiles `proto/zone/v1/*.proto` once for the whole workspace, with a
//! descriptor set for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script compiled for another checkout of the
    // same workspace (a shared target directory) is reused by cargo, and a
    // path baked in with env!() would point into that other checkout.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("zone/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    // The directory too: a new .proto file must trigger a rebuild.
    println!("cargo:rerun-if-changed={}", root.join("zone/v1").display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    if std::env::var_os("PROTOC").is_none() {
        // The vendored protoc keeps the build free of a system package. A
        // build script is single-threaded, so setting the variable is sound.
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("zone_descriptor.bin"))
        .compile_protos(&files, &[root])?;
    Ok(())
}
