//! `credential-provider`: the kubelet image credential-provider exec plugin. Reads one
//! CredentialProviderRequest on stdin, writes one CredentialProviderResponse on stdout; on
//! failure exits non-zero with one line on stderr and nothing on stdout.

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

use credential_provider::{
    Command, Options, answer, decode_request, doctor, encode_response, parse_args,
};

const USAGE: &str = "\
usage: credential-provider [get-credentials] [flags]     (the kubelet's call: request on stdin)
       credential-provider doctor IMAGE [flags]
       credential-provider install DIR [wait]   (copy itself into the kubelet's bin dir)
       credential-provider --version

Installed (or symlinked) as ecr-credential-provider, auth-provider-gcp or
acr-credential-provider it serves that family and takes that plugin's arguments.

flags:
  --provider ecr|gcp|acr|local|auto   force a registry family (default: by program name, else per image)
  --cache-dir DIR        on-disk cache (default /var/lib/kubelet/credential-provider-cache,
                         or $CREDENTIAL_PROVIDER_CACHE_DIR; empty disables)
  --no-cache             do not use the on-disk cache
  --local-config FILE    the local family's credentials file (default
                         /etc/kubernetes/credential-provider/local-registries.yaml,
                         or $CREDENTIAL_PROVIDER_LOCAL_CONFIG)
  --authFlow gcr|dockercfg|dockercfg-url, --identity-provider URL, --project-id ID   (GCP)
  --registry-mirror SRC:DST[,...], AZURE_JSON (positional)                           (ACR)
  --v N, -stderrthreshold ...   accepted for compatibility with klog flags
";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn get_credentials(options: &Options) -> anyhow::Result<String> {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input)?;
    let request = decode_request(&input)?;
    let response = answer(options, &request, now())?;
    Ok(encode_response(request.api_version, &response))
}

/// The names the kubelet config may give the provider; each selects its family.
const INSTALL_NAMES: [&str; 5] = [
    "credential-provider",
    "ecr-credential-provider",
    "auth-provider-gcp",
    "acr-credential-provider",
    "local-credential-provider",
];

/// Copies this executable into `dir` under every name: to a temporary file, then renamed, so
/// the kubelet never executes a half-written binary.
fn install(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let me = std::env::current_exe()?;
    std::fs::create_dir_all(dir)?;
    for name in INSTALL_NAMES {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::copy(&me, &tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut argv = std::env::args();
    let argv0 = argv.next().unwrap_or_default();
    let args: Vec<String> = argv.collect();
    let (command, options) = match parse_args(&argv0, &args, |k| std::env::var(k).ok()) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("credential-provider: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Version => {
            println!("credential-provider {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Install { dir, wait } => match install(&dir) {
            Ok(()) => {
                println!("credential-provider: installed into {}", dir.display());
                if wait {
                    loop {
                        std::thread::park();
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "credential-provider: installing into {}: {e:#}; check the hostPath mount",
                    dir.display()
                );
                ExitCode::FAILURE
            }
        },
        Command::Help => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::Doctor { image } => {
            let (report, ok) = doctor(&options, &image, now());
            print!("{report}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::GetCredentials => match get_credentials(&options) {
            Ok(json) => {
                // One write of the whole answer: never partial JSON.
                let mut stdout = std::io::stdout().lock();
                match writeln!(stdout, "{json}").and_then(|()| stdout.flush()) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("credential-provider: writing the response to stdout: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("credential-provider: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
