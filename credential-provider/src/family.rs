//! Which registry family serves an image: chosen by the program name (existing kubelet
//! configs name the upstream plugins), by `--provider`, or per image from its host.

use crate::matching::{host_of, registry_of, urls_match};

/// A registry family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Amazon ECR (private and Public).
    Ecr,
    /// Google Container Registry and Artifact Registry.
    Gcp,
    /// Azure Container Registry.
    Acr,
    /// Registries listed in the operator's local credentials file.
    Local,
}

impl Family {
    /// The family's name as `--provider` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ecr => "ecr",
            Self::Gcp => "gcp",
            Self::Acr => "acr",
            Self::Local => "local",
        }
    }

    /// Parses a `--provider` value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ecr" | "aws" => Some(Self::Ecr),
            "gcp" | "gcr" | "google" => Some(Self::Gcp),
            "acr" | "azure" => Some(Self::Acr),
            "local" => Some(Self::Local),
            _ => None,
        }
    }

    /// The family an upstream plugin's executable name stands for (the kubelet runs
    /// `<bin-dir>/<provider name>`, so a symlink or copy under that name selects it).
    pub fn from_program_name(argv0: &str) -> Option<Self> {
        let base = argv0.rsplit('/').next().unwrap_or(argv0);
        let base = base.strip_suffix(".exe").unwrap_or(base);
        match base {
            "ecr-credential-provider" => Some(Self::Ecr),
            "auth-provider-gcp" => Some(Self::Gcp),
            "acr-credential-provider" => Some(Self::Acr),
            "local-credential-provider" => Some(Self::Local),
            _ => None,
        }
    }

    /// The family whose registries `image` is on; `None` when it is none of the clouds'
    /// (then the local file decides).
    pub fn detect(image: &str) -> Option<Self> {
        if !matches!(parse_ecr_host(host_of(image)), EcrHost::Other) {
            Some(Self::Ecr)
        } else if is_gcp_registry(image) {
            Some(Self::Gcp)
        } else if acr_login_server(image).is_some() {
            Some(Self::Acr)
        } else {
            None
        }
    }
}

/// An ECR host as the upstream plugin parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EcrHost {
    /// A private registry: `<account>.dkr.ecr[-fips].<region>.<suffix>` or the dual-stack
    /// `<account>.dkr-ecr[-fips].<region>.<suffix>`.
    Private {
        /// The 12-digit account.
        account: String,
        /// The region.
        region: String,
        /// Whether the host is a FIPS one.
        fips: bool,
    },
    /// ECR Public (`public.ecr.aws`, dual-stack `ecr-public.aws.com`); its API is in us-east-1.
    Public,
    /// Not an ECR host.
    Other,
}

/// DNS suffixes of the AWS partitions ECR is in.
const ECR_SUFFIXES: [&str; 9] = [
    "amazonaws.com",
    "amazonaws.com.cn",
    "amazonaws.eu",
    "on.aws",
    "on.amazonwebservices.com.cn",
    "sc2s.sgov.gov",
    "c2s.ic.gov",
    "cloud.adc-e.uk",
    "csp.hci.ic.gov",
];

/// Classifies a host (without port).
pub fn parse_ecr_host(host: &str) -> EcrHost {
    if host == "public.ecr.aws" || host == "ecr-public.aws.com" {
        return EcrHost::Public;
    }
    let labels: Vec<&str> = host.split('.').collect();
    let Some((account, rest)) = labels.split_first() else {
        return EcrHost::Other;
    };
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return EcrHost::Other;
    }
    let (fips, rest) = match rest {
        ["dkr", "ecr", rest @ ..] | ["dkr-ecr", rest @ ..] => (false, rest),
        ["dkr", "ecr-fips", rest @ ..] | ["dkr-ecr-fips", rest @ ..] => (true, rest),
        _ => return EcrHost::Other,
    };
    let Some((region, suffix)) = rest.split_first() else {
        return EcrHost::Other;
    };
    let region_ok = region
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !region_ok || !ECR_SUFFIXES.contains(&suffix.join(".").as_str()) {
        return EcrHost::Other;
    }
    EcrHost::Private {
        account: (*account).to_string(),
        region: (*region).to_string(),
        fips,
    }
}

/// Registries auth-provider-gcp always answers for, besides the image's own.
pub const GCP_REGISTRY_PATTERNS: [&str; 4] = [
    "container.cloud.google.com",
    "gcr.io",
    "*.gcr.io",
    "*.pkg.dev",
];

/// Whether the image is on Container Registry or Artifact Registry.
pub fn is_gcp_registry(image: &str) -> bool {
    let registry = registry_of(image);
    GCP_REGISTRY_PATTERNS
        .iter()
        .any(|p| urls_match(p, registry))
}

/// ACR's public-cloud DNS suffixes.
const ACR_SUFFIXES: [&str; 4] = ["azurecr.io", "azurecr.cn", "azurecr.de", "azurecr.us"];

/// The ACR login server of an image (`<name>.azurecr.<io|cn|de|us>`, or under
/// `extra_suffix` from the cloud config), anchored so that look-alike hosts do not match.
pub fn acr_login_server(image: &str) -> Option<&str> {
    acr_login_server_with(image, None)
}

/// [`acr_login_server`] with a custom cloud's registry DNS suffix.
pub fn acr_login_server_with<'a>(image: &'a str, extra_suffix: Option<&str>) -> Option<&'a str> {
    let registry = registry_of(image);
    let (name, suffix) = registry.split_once('.')?;
    let suffix_ok = ACR_SUFFIXES.contains(&suffix)
        || extra_suffix.is_some_and(|s| s.trim_start_matches('.') == suffix);
    (suffix_ok && !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some(registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private(account: &str, region: &str, fips: bool) -> EcrHost {
        EcrHost::Private {
            account: account.into(),
            region: region.into(),
            fips,
        }
    }

    // Upstream `Test_parseRegionFromECRPrivateHost` and `TestRegistryPatternMatch`.
    #[test]
    fn parse_region_from_ecr_private_host_upstream_cases() {
        let cases = [
            (
                "123456789012.dkr.ecr.us-west-2.amazonaws.com",
                private("123456789012", "us-west-2", false),
            ),
            (
                "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn",
                private("123456789012", "cn-north-1", false),
            ),
            (
                "123456789012.dkr.ecr.us-gov-east-1.amazonaws.com",
                private("123456789012", "us-gov-east-1", false),
            ),
            (
                "123456789012.dkr.ecr.us-iso-east-1.c2s.ic.gov",
                private("123456789012", "us-iso-east-1", false),
            ),
            (
                "123456789012.dkr.ecr.us-isob-east-1.sc2s.sgov.gov",
                private("123456789012", "us-isob-east-1", false),
            ),
            (
                "123456789012.dkr.ecr.eusc-de-east-1.amazonaws.eu",
                private("123456789012", "eusc-de-east-1", false),
            ),
            (
                "123456789012.dkr.ecr-fips.us-east-1.amazonaws.com",
                private("123456789012", "us-east-1", true),
            ),
            (
                "123456789012.dkr-ecr.us-west-2.on.aws",
                private("123456789012", "us-west-2", false),
            ),
            (
                "123456789012.dkr-ecr-fips.us-west-2.on.aws",
                private("123456789012", "us-west-2", true),
            ),
            (
                "123456789012.dkr-ecr.cn-north-1.on.amazonwebservices.com.cn",
                private("123456789012", "cn-north-1", false),
            ),
            ("public.ecr.aws", EcrHost::Public),
            ("ecr-public.aws.com", EcrHost::Public),
            // invalid hosts
            (
                "1234567890123.dkr.ecr.us-west-2.amazonaws.com",
                EcrHost::Other,
            ),
            (
                "12345678901.dkr.ecr.us-west-2.amazonaws.com",
                EcrHost::Other,
            ),
            (
                "123456789012.dkr.ecr.us-w$st-2.amazonaws.com",
                EcrHost::Other,
            ),
            (
                "123456789012.dkr.ecr.us-west-2.amazonaws.hacker.com",
                EcrHost::Other,
            ),
            (
                "123456789012.dkr.ecr.us-west-2.amazonaws.lol",
                EcrHost::Other,
            ),
            (
                "123456789012.dog.ecr.us-west-2.amazonaws.com",
                EcrHost::Other,
            ),
            ("registry.k8s.io", EcrHost::Other),
        ];
        for (host, want) in cases {
            assert_eq!(parse_ecr_host(host), want, "{host}");
        }
    }

    #[test]
    fn detect_family_per_image() {
        let d = |i: &str| Family::detect(i);
        assert_eq!(
            d("123456789012.dkr.ecr.eu-west-1.amazonaws.com/app:1"),
            Some(Family::Ecr)
        );
        // The upstream test "image reference containing public ECR host": a private host.
        assert_eq!(
            d("123456789012.dkr.ecr.eu-west-1.amazonaws.com/public.ecr.aws/app"),
            Some(Family::Ecr)
        );
        assert_eq!(d("public.ecr.aws/nginx/nginx"), Some(Family::Ecr));
        assert_eq!(d("gcr.io/p/app"), Some(Family::Gcp));
        assert_eq!(d("eu.gcr.io/p/app"), Some(Family::Gcp));
        assert_eq!(d("europe-docker.pkg.dev/p/r/app"), Some(Family::Gcp));
        assert_eq!(d("myreg.azurecr.io/app"), Some(Family::Acr));
        assert_eq!(d("myreg.azurecr.io.evil.com/app"), None);
        assert_eq!(d("my-reg.azurecr.io/app"), None);
        assert_eq!(d("127.0.0.1:5000/app"), None);
    }

    #[test]
    fn program_names_of_the_upstream_plugins() {
        assert_eq!(
            Family::from_program_name(
                "/usr/libexec/kubernetes/kubelet-plugins/credential-provider/exec/ecr-credential-provider"
            ),
            Some(Family::Ecr)
        );
        assert_eq!(
            Family::from_program_name("auth-provider-gcp"),
            Some(Family::Gcp)
        );
        assert_eq!(
            Family::from_program_name("acr-credential-provider.exe"),
            Some(Family::Acr)
        );
        assert_eq!(Family::from_program_name("credential-provider"), None);
    }
}
