//! The command line: this binary's own flags plus the arguments kubelet configs already give
//! the upstream plugins (`get-credentials`, `--authFlow`, `--identity-provider`,
//! `--project-id`, klog's `--v`; acr-credential-provider's config-file argument and
//! `--registry-mirror`; ecr-credential-provider ignores its arguments).

use std::path::PathBuf;

use crate::error::Error;
use crate::family::Family;

/// Where the on-disk cache lives unless `--cache-dir` or the environment says otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/kubelet/credential-provider-cache";
/// Where the `local` family's credentials file is unless `--local-config` says otherwise.
pub const DEFAULT_LOCAL_CONFIG: &str = "/etc/kubernetes/credential-provider/local-registries.yaml";
/// Environment variable overriding [`DEFAULT_CACHE_DIR`] (empty disables the cache).
pub const CACHE_DIR_ENV: &str = "CREDENTIAL_PROVIDER_CACHE_DIR";
/// Environment variable overriding [`DEFAULT_LOCAL_CONFIG`].
pub const LOCAL_CONFIG_ENV: &str = "CREDENTIAL_PROVIDER_LOCAL_CONFIG";

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Answer one request from stdin (the kubelet's call).
    GetCredentials,
    /// Explain how an image would be served, and try it.
    Doctor {
        /// The image.
        image: String,
    },
    /// Copy this binary into a directory under every provider name (the DaemonSet's job).
    Install {
        /// The kubelet's `--image-credential-provider-bin-dir` as mounted.
        dir: PathBuf,
        /// Keep running afterwards (a DaemonSet container must not exit).
        wait: bool,
    },
    /// Print the version.
    Version,
    /// Print the usage.
    Help,
}

/// auth-provider-gcp's `--authFlow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GcpAuthFlow {
    /// An access token of the node's (or the workload's) service account.
    #[default]
    Gcr,
    /// A docker config in the instance metadata attribute `google-dockercfg`.
    Dockercfg,
    /// A docker config at the URL in the metadata attribute `google-dockercfg-url`.
    DockercfgUrl,
}

/// Options of the GCP family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcpOptions {
    /// `--authFlow`.
    pub auth_flow: GcpAuthFlow,
    /// `--identity-provider`: enables workload identity federation.
    pub identity_provider: Option<String>,
    /// `--project-id`: the workload identity pool's project.
    pub project_id: Option<String>,
}

/// Options of the ACR family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcrOptions {
    /// The Azure cloud config (`azure.json`), acr-credential-provider's positional argument.
    pub cloud_config: Option<PathBuf>,
    /// `--registry-mirror src:dst` pairs.
    pub mirrors: Vec<(String, String)>,
}

/// Everything the command line and environment decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The family fixed by the program name or `--provider`; `None`: per image.
    pub family: Option<Family>,
    /// The on-disk cache's directory; `None` disables it.
    pub cache_dir: Option<PathBuf>,
    /// The `local` family's credentials file.
    pub local_config: PathBuf,
    /// GCP options.
    pub gcp: GcpOptions,
    /// ACR options.
    pub acr: AcrOptions,
}

/// Flags that take a value (long names; single-dash forms are accepted too, like Go's).
const VALUE_FLAGS: [&str; 14] = [
    "provider",
    "cache-dir",
    "local-config",
    "authFlow",
    "identity-provider",
    "project-id",
    "v",
    "stderrthreshold",
    "registry-mirror",
    "ib-sni-name",
    "ib-default-client-id",
    "ib-default-tenant-id",
    "ib-apiserver-ip",
    "log-file",
];
/// Boolean flags (klog's are accepted and ignored: this plugin logs nothing but errors).
const BOOL_FLAGS: [&str; 6] = [
    "no-cache",
    "version",
    "help",
    "logtostderr",
    "alsologtostderr",
    "add_dir_header",
];

/// Parses the command line. `env` reads the environment (a parameter so tests are pure).
pub fn parse_args(
    argv0: &str,
    args: &[String],
    env: impl Fn(&str) -> Option<String>,
) -> Result<(Command, Options), Error> {
    let mut family = Family::from_program_name(argv0);
    let mut cache_dir = env(CACHE_DIR_ENV).map_or(Some(PathBuf::from(DEFAULT_CACHE_DIR)), |d| {
        (!d.is_empty()).then(|| PathBuf::from(d))
    });
    let mut local_config =
        PathBuf::from(env(LOCAL_CONFIG_ENV).unwrap_or_else(|| DEFAULT_LOCAL_CONFIG.to_string()));
    let mut gcp = GcpOptions::default();
    let mut acr = AcrOptions::default();
    let mut positionals = Vec::new();
    let mut command = None;

    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let Some(flag) = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-').filter(|f| !f.is_empty()))
        else {
            positionals.push(arg.clone());
            continue;
        };
        if flag.is_empty() {
            // `--`: the rest is positional.
            positionals.extend(args[i..].iter().cloned());
            break;
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        let name = match name {
            "a" => "authFlow",
            "r" => "registry-mirror",
            "h" => "help",
            other => other,
        };
        if BOOL_FLAGS.contains(&name) {
            match name {
                "no-cache" => cache_dir = None,
                "version" => command = Some(Command::Version),
                "help" => command = Some(Command::Help),
                _ => {}
            }
            continue;
        }
        if !VALUE_FLAGS.contains(&name) {
            return Err(Error::Args(format!("unknown flag {arg:?}")));
        }
        let value = match inline {
            Some(v) => v,
            None => {
                let v = args
                    .get(i)
                    .ok_or_else(|| Error::Args(format!("flag --{name} needs a value")))?;
                i += 1;
                v.clone()
            }
        };
        match name {
            "provider" => {
                family = match value.as_str() {
                    "auto" => None,
                    v => Some(Family::parse(v).ok_or_else(|| {
                        Error::Args(format!(
                            "--provider {v:?} is not one of ecr, gcp, acr, local, auto"
                        ))
                    })?),
                }
            }
            "cache-dir" => cache_dir = (!value.is_empty()).then(|| PathBuf::from(&value)),
            "local-config" => local_config = PathBuf::from(value),
            "authFlow" => {
                gcp.auth_flow = match value.as_str() {
                    "gcr" => GcpAuthFlow::Gcr,
                    "dockercfg" => GcpAuthFlow::Dockercfg,
                    "dockercfg-url" => GcpAuthFlow::DockercfgUrl,
                    v => {
                        return Err(Error::Args(format!(
                            "--authFlow {v:?} is not one of gcr, dockercfg, dockercfg-url"
                        )));
                    }
                }
            }
            "identity-provider" => gcp.identity_provider = Some(value).filter(|v| !v.is_empty()),
            "project-id" => gcp.project_id = Some(value).filter(|v| !v.is_empty()),
            "registry-mirror" => {
                for pair in value.split(',').filter(|p| !p.is_empty()) {
                    let (src, dst) = pair.split_once(':').ok_or_else(|| {
                        Error::Args(format!(
                            "--registry-mirror entry {pair:?} is not SOURCE:DESTINATION"
                        ))
                    })?;
                    acr.mirrors.push((src.to_string(), dst.to_string()));
                }
            }
            "ib-sni-name" | "ib-default-client-id" | "ib-default-tenant-id" | "ib-apiserver-ip" => {
                return Err(Error::Args(format!(
                    "--{name} (AKS identity bindings) is not supported; use managed identity or the service-account token mode"
                )));
            }
            // klog's verbosity and thresholds: accepted for compatibility.
            _ => {}
        }
    }

    if gcp.identity_provider.is_some() && gcp.project_id.is_none() {
        return Err(Error::Args(
            "--identity-provider needs --project-id".to_string(),
        ));
    }
    if gcp.identity_provider.is_some() && gcp.auth_flow != GcpAuthFlow::Gcr {
        return Err(Error::Args(
            "--identity-provider works only with --authFlow gcr".to_string(),
        ));
    }

    let mut rest = positionals.into_iter().peekable();
    let command = match command {
        Some(c) => c,
        None => match rest.peek().map(String::as_str) {
            Some("doctor") => {
                rest.next();
                let image = rest
                    .next()
                    .ok_or_else(|| Error::Args("doctor needs an IMAGE".to_string()))?;
                Command::Doctor { image }
            }
            Some("version") => Command::Version,
            Some("install") => {
                rest.next();
                let dir = rest
                    .next()
                    .ok_or_else(|| Error::Args("install needs a DIRECTORY".to_string()))?;
                let wait = rest.peek().map(String::as_str) == Some("wait");
                Command::Install {
                    dir: PathBuf::from(dir),
                    wait,
                }
            }
            _ => Command::GetCredentials,
        },
    };
    // acr-credential-provider's one positional argument is its cloud config.
    let remaining: Vec<String> = rest.filter(|a| a != "get-credentials").collect();
    if family == Some(Family::Acr) || family.is_none() {
        acr.cloud_config = remaining.first().map(PathBuf::from);
    }

    Ok((
        command,
        Options {
            family,
            cache_dir,
            local_config,
            gcp,
            acr,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv0: &str, args: &[&str]) -> Result<(Command, Options), Error> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse_args(argv0, &args, |_| None)
    }

    #[test]
    fn gce_configure_sh_arguments_work_under_the_upstream_name() {
        let (cmd, o) = parse("auth-provider-gcp", &["get-credentials", "--v=3"]).unwrap();
        assert_eq!(cmd, Command::GetCredentials);
        assert_eq!(o.family, Some(Family::Gcp));
        assert_eq!(o.gcp.auth_flow, GcpAuthFlow::Gcr);
        let (_, o) = parse(
            "auth-provider-gcp",
            &[
                "get-credentials",
                "--authFlow=gcr",
                "--identity-provider",
                "https://c",
                "--project-id",
                "p",
                "-v",
                "3",
            ],
        )
        .unwrap();
        assert_eq!(o.gcp.identity_provider.as_deref(), Some("https://c"));
        assert_eq!(o.gcp.project_id.as_deref(), Some("p"));
    }

    #[test]
    fn acr_example_config_arguments() {
        let (_, o) = parse(
            "acr-credential-provider",
            &[
                "/etc/kubernetes/azure.json",
                "--registry-mirror=mcr.microsoft.com:xxx.azurecr.io",
            ],
        )
        .unwrap();
        assert_eq!(o.family, Some(Family::Acr));
        assert_eq!(
            o.acr.cloud_config,
            Some(PathBuf::from("/etc/kubernetes/azure.json"))
        );
        assert_eq!(
            o.acr.mirrors,
            vec![("mcr.microsoft.com".into(), "xxx.azurecr.io".into())]
        );
    }

    #[test]
    fn ecr_ignores_positional_arguments_and_provider_flag_forces() {
        let (cmd, o) = parse("ecr-credential-provider", &["get-credentials"]).unwrap();
        assert_eq!(
            (cmd, o.family),
            (Command::GetCredentials, Some(Family::Ecr))
        );
        let (_, o) = parse(
            "credential-provider",
            &["--provider", "local", "--no-cache"],
        )
        .unwrap();
        assert_eq!(o.family, Some(Family::Local));
        assert_eq!(o.cache_dir, None);
    }

    #[test]
    fn doctor_and_bad_flags() {
        let (cmd, _) = parse("credential-provider", &["doctor", "gcr.io/p/a"]).unwrap();
        assert_eq!(
            cmd,
            Command::Doctor {
                image: "gcr.io/p/a".into()
            }
        );
        for bad in [
            &["--bogus"][..],
            &["--provider", "quay"],
            &["--authFlow", "x"],
            &["--identity-provider", "x"],
            &["--registry-mirror", "nocolon"],
            &["--ib-sni-name", "x"],
            &["doctor"],
            &["--cache-dir"],
        ] {
            assert!(
                matches!(parse("credential-provider", bad), Err(Error::Args(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn environment_sets_cache_and_local_file() {
        let args: Vec<String> = vec![];
        let (_, o) = parse_args("credential-provider", &args, |k| match k {
            CACHE_DIR_ENV => Some(String::new()),
            LOCAL_CONFIG_ENV => Some("/x.yaml".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(o.cache_dir, None);
        assert_eq!(o.local_config, PathBuf::from("/x.yaml"));
    }
}
