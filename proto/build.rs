//! Compiles the nodecrypt protos with the vendored protoc (no system protoc needed).

// `std::env::set_var` is unsafe (other threads may read the environment); here none do.
#[allow(unsafe_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("nodecrypt_descriptor.bin"))
        // Messages that carry key bytes get a hand-written, redacting Debug (see lib.rs).
        .skip_debug(["nodecrypt.keybroker.v1.VolumeKey"])
        .codec_path("crate::codec::StrictCodec")
        .compile_with_config(
            config,
            &[
                "nodecrypt/keybroker/v1/keybroker.proto",
                "nodecrypt/agent/v1/agent.proto",
            ],
            &["."],
        )?;
    Ok(())
}
