//! Test images built here from Debian's static busybox (no registry to pull one from).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;
use crate::host::run;

/// Where Debian's busybox-static puts the binary.
const BUSYBOX: &str = "/bin/busybox";

/// An image written as an OCI archive.
#[derive(Debug, Clone)]
pub struct ImageArchive {
    /// The archive file.
    pub path: PathBuf,
    /// The image's name (reference) inside it.
    pub name: String,
}

/// Builds `name` from scratch with busybox as `/bin/busybox` (entrypoint), `/www/index.html`
/// holding `page`, running as uid 65532, into `dir/<file-safe name>.oci.tar`. Run it as
/// `args: [httpd, -f, -p, "8080", -h, /www]` for a web server answering `page`.
pub fn busybox_image(dir: &Path, name: &str, page: &str) -> Result<ImageArchive, Error> {
    if !Path::new(BUSYBOX).exists() {
        return Err(Error::Missing {
            what: "busybox (Debian's busybox-static)",
            path: PathBuf::from(BUSYBOX),
        });
    }
    let staging = dir.join(format!("{}-rootfs", file_name(name)));
    std::fs::create_dir_all(staging.join("www"))
        .map_err(Error::io(format!("creating {}", staging.display())))?;
    std::fs::write(staging.join("www/index.html"), page)
        .map_err(Error::io("writing index.html"))?;
    let container = run(cmd("buildah", &["from", "scratch"]))?.trim().to_owned();
    let built = (|| {
        run(cmd(
            "buildah",
            &["copy", &container, BUSYBOX, "/bin/busybox"],
        ))?;
        run(cmd(
            "buildah",
            &[
                "copy",
                &container,
                &staging.join("www").display().to_string(),
                "/www",
            ],
        ))?;
        run(cmd(
            "buildah",
            &[
                "config",
                "--entrypoint",
                r#"["/bin/busybox"]"#,
                "--user",
                "65532:65532",
                &container,
            ],
        ))?;
        run(cmd("buildah", &["commit", "-q", &container, name]))?;
        let path = dir.join(format!("{}.oci.tar", file_name(name)));
        let _ = std::fs::remove_file(&path);
        run(cmd(
            "buildah",
            &[
                "push",
                "-q",
                name,
                &format!("oci-archive:{}:{name}", path.display()),
            ],
        ))?;
        Ok(ImageArchive {
            path,
            name: name.to_owned(),
        })
    })();
    let _ = run(cmd("buildah", &["rm", &container]));
    let _ = run(cmd("buildah", &["rmi", name]));
    built
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn file_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}
