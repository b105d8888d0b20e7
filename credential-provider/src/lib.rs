//! The kubelet image credential-provider exec plugin: one binary for ECR, GCR / Artifact
//! Registry, ACR and operator-managed local registries, answering every
//! `credentialprovider.kubelet.k8s.io` version, with an on-disk cache shared between
//! invocations.
//!
//! Pure decisions (protocol decoding, image matching, family selection, cache validity given
//! `now`, response building) are separate from the IO (stdin/stdout, the cache file, the
//! token services).

mod acr;
mod args;
mod cache;
mod ecr;
mod error;
mod family;
mod fetched;
mod gcp;
mod http;
mod local;
mod matching;
mod protocol;
mod provider;
#[cfg(feature = "test-servers")]
pub mod testing;

pub use args::{
    AcrOptions, CACHE_DIR_ENV, Command, DEFAULT_CACHE_DIR, DEFAULT_LOCAL_CONFIG, GcpAuthFlow,
    GcpOptions, LOCAL_CONFIG_ENV, Options, parse_args,
};
pub use cache::{
    CacheEntry, CacheState, DiskCache, MAX_ENTRIES, insert as cache_insert, lookup as cache_lookup,
};
pub use error::Error;
pub use family::{EcrHost, Family, acr_login_server, is_gcp_registry, parse_ecr_host};
pub use fetched::Fetched;
pub use local::{LocalConfig, LocalEntry, load_local_config, parse_local_config, resolve_local};
pub use matching::{host_of, image_without_tag, registry_of, urls_match};
pub use protocol::{
    ApiVersion, AuthConfig, CacheKeyType, CredentialProviderRequest, CredentialProviderResponse,
    DecodeError, DecodedResponse, GROUP, decode_request, decode_response, encode_response,
    format_go_duration, parse_go_duration,
};
pub use provider::{answer, cache_key, choose_family, doctor, entry_to_store, fetch};
