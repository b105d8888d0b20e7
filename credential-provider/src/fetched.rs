//! What every registry family returns, shared by the families and the code that chooses
//! between them (so that neither imports the other).

use base64::Engine as _;

use crate::error::Error;
use crate::protocol::{AuthConfig, CredentialProviderResponse};

/// What a token service answered: the response and when its credentials expire.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The response for the kubelet.
    pub response: CredentialProviderResponse,
    /// When the credentials expire (Unix seconds), if known; only then is it cached on disk.
    pub expires_at: Option<i64>,
}

/// Splits a base64 `user:password` token, as ECR and Docker config files carry it.
pub(crate) fn split_token(encoded: &str) -> Result<AuthConfig, Error> {
    let bad = || Error::BadAnswer {
        service: "ECR",
        what: "authorization token (base64 of user:password)",
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    let (user, password) = text.split_once(':').ok_or_else(bad)?;
    Ok(AuthConfig {
        username: user.to_string(),
        password: password.to_string(),
    })
}
