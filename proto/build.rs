//! Generates the cloudprovider.v1 client and server code. `protoc` comes from the vendored crate
//! unless `PROTOC` names another one, so the build needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => std::path::PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &["cloudprovider/v1/cloudprovider.proto"], &["."])?;
    println!("cargo:rerun-if-changed=cloudprovider/v1/cloudprovider.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
