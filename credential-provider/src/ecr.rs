//! Amazon ECR: `GetAuthorizationToken` (private registries, or ECR Public in us-east-1)
//! through the AWS SDK, as the node (default credential chain) or, with a service-account
//! token, as the role the service account names (STS `AssumeRoleWithWebIdentity`).

use std::collections::BTreeMap;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};

use crate::error::Error;
use crate::family::EcrHost;
use crate::fetched::Fetched;
use crate::fetched::split_token;
use crate::protocol::{AuthConfig, CacheKeyType, CredentialProviderResponse};

/// The service-account annotation naming the role to pull as.
pub const ROLE_ANNOTATION: &str = "eks.amazonaws.com/ecr-role-arn";
/// The environment variable naming the role when the annotation is absent.
pub const ROLE_ENV: &str = "AWS_ECR_ROLE_ARN";
const SESSION_NAME: &str = "ecr-credential-provider";
/// ECR Public's API is only in this region.
const PUBLIC_REGION: &str = "us-east-1";
/// SDK operation deadline, inside the kubelet's one-minute exec timeout.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The role a service-account token pulls as: the annotation, else `AWS_ECR_ROLE_ARN`.
pub fn role_for(
    annotations: &BTreeMap<String, String>,
    env_role: Option<String>,
) -> Option<String> {
    annotations
        .get(ROLE_ANNOTATION)
        .cloned()
        .or(env_role)
        .filter(|r| !r.is_empty())
}

/// The region the API call goes to: the host's, us-east-1 for ECR Public, else the SDK's.
pub fn region_for(host: &EcrHost) -> Option<&str> {
    match host {
        EcrHost::Private { region, .. } => Some(region),
        EcrHost::Public => Some(PUBLIC_REGION),
        EcrHost::Other => None,
    }
}

/// The response for a token expiring at `expires_at` obtained at `now` (Unix seconds): keyed
/// by registry host, cached by the kubelet for half the remaining life; an expiry in the past
/// or none means "do not cache" (explicitly 0, never the kubelet's default).
pub fn build_response(host: &str, auth: AuthConfig, expires_at: Option<i64>, now: i64) -> Fetched {
    let half = expires_at.map_or(0, |t| u64::try_from((t - now) / 2).unwrap_or(0));
    Fetched {
        response: CredentialProviderResponse {
            cache_key_type: CacheKeyType::Registry,
            cache_duration: Some(Duration::from_secs(half)),
            auth: BTreeMap::from([(host.to_string(), auth)]),
        },
        expires_at,
    }
}

/// Obtains a token for `host` (an image host without port).
pub async fn fetch(
    host: &str,
    parsed: &EcrHost,
    web_identity: Option<(&str, &str)>,
    now: i64,
) -> Result<Fetched, Error> {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        );
    if let Some(region) = region_for(parsed) {
        loader = loader.region(Region::new(region.to_string()));
    }
    let conf = loader.load().await;
    if conf.region().is_none() {
        return Err(Error::AwsConfig(format!(
            "{host} is not an ECR host and no region is configured; set AWS_REGION in the provider's env"
        )));
    }
    let mut ecr_conf = aws_sdk_ecr::config::Builder::from(&conf);
    let mut public_conf = aws_sdk_ecrpublic::config::Builder::from(&conf);
    if let Some((role, token)) = web_identity {
        let creds = assume_role(&conf, role, token).await?;
        ecr_conf = ecr_conf.credentials_provider(creds.clone());
        public_conf = public_conf.credentials_provider(creds);
    }
    let (token, expires) = if matches!(parsed, EcrHost::Public) {
        let out = aws_sdk_ecrpublic::Client::from_conf(public_conf.build())
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| Error::AwsCall {
                call: "ECR Public GetAuthorizationToken",
                detail: aws_sdk_ecrpublic::error::DisplayErrorContext(&e).to_string(),
            })?;
        let data = out.authorization_data().ok_or(Error::BadAnswer {
            service: "ECR Public",
            what: "authorization data",
        })?;
        (
            data.authorization_token().map(str::to_string),
            data.expires_at().map(|t| t.secs()),
        )
    } else {
        let out = aws_sdk_ecr::Client::from_conf(ecr_conf.build())
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| Error::AwsCall {
                call: "ECR GetAuthorizationToken",
                detail: aws_sdk_ecr::error::DisplayErrorContext(&e).to_string(),
            })?;
        let data = out.authorization_data().first().ok_or(Error::BadAnswer {
            service: "ECR",
            what: "authorization data",
        })?;
        (
            data.authorization_token().map(str::to_string),
            data.expires_at().map(|t| t.secs()),
        )
    };
    let token = token.ok_or(Error::BadAnswer {
        service: "ECR",
        what: "authorization token",
    })?;
    Ok(build_response(host, split_token(&token)?, expires, now))
}

async fn assume_role(
    conf: &aws_config::SdkConfig,
    role: &str,
    token: &str,
) -> Result<aws_credential_types::Credentials, Error> {
    let out = aws_sdk_sts::Client::new(conf)
        .assume_role_with_web_identity()
        .role_arn(role)
        .role_session_name(SESSION_NAME)
        .web_identity_token(token)
        .send()
        .await
        .map_err(|e| Error::AssumeRole {
            role: role.to_string(),
            detail: aws_sdk_sts::error::DisplayErrorContext(&e).to_string(),
        })?;
    let c = out.credentials().ok_or(Error::BadAnswer {
        service: "STS AssumeRoleWithWebIdentity",
        what: "credentials",
    })?;
    let expiry = std::time::SystemTime::try_from(*c.expiration()).ok();
    Ok(aws_credential_types::Credentials::new(
        c.access_key_id(),
        c.secret_access_key(),
        Some(c.session_token().to_string()),
        expiry,
        "web-identity",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn token_split_and_cache_duration_upstream_rules() {
        let enc = base64::engine::general_purpose::STANDARD.encode("AWS:pa:ss");
        let auth = split_token(&enc).unwrap();
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("AWS", "pa:ss")
        );
        assert!(split_token("!!!").is_err());
        let nocolon = base64::engine::general_purpose::STANDARD.encode("nocolon");
        assert!(split_token(&nocolon).is_err());

        let a = || AuthConfig {
            username: "AWS".into(),
            password: "p".into(),
        };
        // 12 h token: the kubelet caches it for 6 h.
        let f = build_response("r", a(), Some(12 * 3600), 0);
        assert_eq!(
            f.response.cache_duration,
            Some(Duration::from_secs(6 * 3600))
        );
        // moto's expiry of 2015: explicitly 0, not the kubelet's default.
        let f = build_response("r", a(), Some(1_420_070_400), 1_800_000_000);
        assert_eq!(f.response.cache_duration, Some(Duration::ZERO));
        let f = build_response("r", a(), None, 0);
        assert_eq!(f.response.cache_duration, Some(Duration::ZERO));
    }

    #[test]
    fn role_from_annotation_then_environment() {
        let ann = BTreeMap::from([(ROLE_ANNOTATION.to_string(), "arn:a".to_string())]);
        assert_eq!(
            role_for(&ann, Some("arn:e".into())).as_deref(),
            Some("arn:a")
        );
        assert_eq!(
            role_for(&BTreeMap::new(), Some("arn:e".into())).as_deref(),
            Some("arn:e")
        );
        assert_eq!(role_for(&BTreeMap::new(), None), None);
    }
}
