//! Who may connect: mutual TLS 1.3 where every node certificate is signed by a CA that
//! every agent derives from the cluster secret.
//!
//! The CA key is Ed25519 with its seed derived from the secret (`SecretKdf`), so agents
//! with the same secret trust each other without ever exchanging a certificate, and a peer
//! with another secret fails the handshake (unknown issuer / bad signature) on both ends.
//! Each node signs its own certificate at start with a key kept in the state store.
//!
//! Anyone who can reach the port sees a node certificate (the server sends it before it
//! asks for the client's), so every handshake is an offline test for a guessed secret.
//! `strength` refuses secrets a password cracker would find (estimated by zxcvbn, not by
//! length), and `--secret-kdf argon2id` makes each guess memory-hard (19 MiB, 2 passes —
//! OWASP's minimum; tens of ms, paid once per start by a node and once per guess by an
//! attacker). It is not the default yet: nodes with different KDFs do not authenticate each
//! other, so switching an existing cluster splits its control plane until every node runs
//! the same one (a transition that trusts both is future work).
//!
//! `--insecure-no-auth` replaces this with self-signed certificates and a verifier that
//! checks only the handshake signature: encrypted, but anyone can join. It is an explicit
//! choice and `meshctl status` shows it.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ED25519,
};
use ring::hkdf;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as TlsDn, SignatureScheme};

use mesh_proto::wire::ALPN;

/// The name every node certificate carries and every dialer asks for.
pub const SERVER_NAME: &str = "mesh.peer";
/// The HKDF salt (the default derivation, unchanged since the first release).
const CA_LABEL: &[u8] = b"mesh cluster CA v1";
/// The Argon2id salt: another label, so the two derivations never give the same CA.
const CA_LABEL_ARGON2: &[u8] = b"mesh cluster CA v2 (argon2id)";

/// How the CA key is derived from the cluster secret; every node must use the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SecretKdf {
    /// HKDF-SHA256: fast; what every earlier version used.
    Hkdf,
    /// Argon2id (19 MiB, 2 passes): each offline guess of the secret costs as much.
    Argon2id,
}

/// The least a secret must cost a password cracker: zxcvbn's estimate of guesses, as a
/// power of ten (10^16 ≈ 2^53, on top of the memory-hard derivation). A random secret
/// from `head -c 32 /dev/urandom | base64` is estimated far above it.
pub const MIN_GUESSES_LOG10: f64 = 16.0;

/// Whether `secret` is strong enough, and if not, how guessable it is estimated to be.
pub fn strength(secret: &[u8]) -> Result<(), f64> {
    // A binary secret is judged by its hex form (lossy UTF-8 would turn it into a run
    // of replacement characters, which reads as a repeat).
    let text = match std::str::from_utf8(secret) {
        Ok(t) => t.to_string(),
        Err(_) => secret.iter().map(|b| format!("{b:02x}")).collect(),
    };
    let guesses = zxcvbn::zxcvbn(&text, &[]).guesses_log10();
    if guesses >= MIN_GUESSES_LOG10 {
        Ok(())
    } else {
        Err(guesses)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cluster secret is too short ({0} bytes): use at least 16, e.g. `head -c 32 /dev/urandom | base64 > secret`")]
    WeakSecret(usize),
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(String),
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

/// How this agent authenticates peers.
pub enum Auth {
    ClusterSecret(Vec<u8>, SecretKdf),
    InsecureNoAuth,
}

impl Auth {
    pub fn describe(&self) -> &'static str {
        match self {
            Auth::ClusterSecret(_, _) => "mutual-tls (cluster secret)",
            Auth::InsecureNoAuth => "insecure-no-auth",
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A fresh node key (PKCS#8 DER) to persist on first start.
pub fn generate_node_key() -> Result<Vec<u8>, TlsError> {
    Ok(KeyPair::generate_for(&PKCS_ED25519)?.serialize_der())
}

/// RFC 8410 PKCS#8 v1 wrapping of an Ed25519 seed.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

fn ca_key_from_secret(secret: &[u8], kdf: SecretKdf) -> Result<KeyPair, TlsError> {
    if secret.len() < 16 {
        return Err(TlsError::WeakSecret(secret.len()));
    }
    let mut seed = [0u8; 32];
    match kdf {
        SecretKdf::Hkdf => {
            let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, CA_LABEL).extract(secret);
            prk.expand(&[b"ca-key"], hkdf::HKDF_SHA256)
                .and_then(|okm| okm.fill(&mut seed))
                .map_err(|_| TlsError::Verifier("HKDF expansion failed".into()))?;
        }
        SecretKdf::Argon2id => {
            let params = argon2::Params::new(19 * 1024, 2, 1, Some(32))
                .map_err(|e| TlsError::Verifier(format!("Argon2 parameters: {e}")))?;
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password_into(secret, CA_LABEL_ARGON2, &mut seed)
                .map_err(|e| TlsError::Verifier(format!("Argon2id: {e}")))?;
        }
    }
    let der = ed25519_pkcs8(&seed);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der));
    Ok(KeyPair::from_der_and_sign_algo(&key, &PKCS_ED25519)?)
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "mesh cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    p
}

fn node_params(node_name: &str) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_name);
    p.distinguished_name = dn;
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// Both halves of the QUIC endpoint's crypto.
pub struct EndpointCrypto {
    pub server: quinn::ServerConfig,
    pub client: quinn::ClientConfig,
}

pub fn endpoint_crypto(
    auth: &Auth,
    node_name: &str,
    node_key_der: &[u8],
) -> Result<EndpointCrypto, TlsError> {
    let node_key = KeyPair::try_from(node_key_der)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(node_key_der.to_vec()));
    let params = node_params(node_name)?;
    let provider = provider();
    let (server, client) = match auth {
        Auth::ClusterSecret(secret, kdf) => {
            let ca_key = ca_key_from_secret(secret, *kdf)?;
            let ca_cert = ca_params().self_signed(&ca_key)?;
            let issuer = Issuer::new(ca_params(), ca_key);
            let cert = params.signed_by(&node_key, &issuer)?;
            let chain = vec![cert.der().clone()];
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca_cert.der().clone())?;
            let roots = Arc::new(roots);
            let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider.clone(),
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            let server = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(client_verifier)
                .with_single_cert(chain.clone(), key_der.clone_key())?;
            let client = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key_der)?;
            (server, client)
        }
        Auth::InsecureNoAuth => {
            let cert = params.self_signed(&node_key)?;
            let chain = vec![cert.der().clone()];
            let accept_any = Arc::new(AcceptAnyCert(provider.clone()));
            let server = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(accept_any.clone())
                .with_single_cert(chain.clone(), key_der.clone_key())?;
            let client = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(accept_any)
                .with_client_auth_cert(chain, key_der)?;
            (server, client)
        }
    };
    Ok(EndpointCrypto {
        server: quic_server(server)?,
        client: quic_client(client)?,
    })
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Keep-alives make a dead peer's connection time out in 10 s rather than never.
    t.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    t.max_idle_timeout(Some(quinn::VarInt::from_u32(10_000).into()));
    t.max_concurrent_uni_streams(0u8.into());
    t.max_concurrent_bidi_streams(4u8.into());
    Arc::new(t)
}

fn quic_server(mut cfg: rustls::ServerConfig) -> Result<quinn::ServerConfig, TlsError> {
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport_config());
    Ok(server)
}

fn quic_client(mut cfg: rustls::ClientConfig) -> Result<quinn::ClientConfig, TlsError> {
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport_config());
    Ok(client)
}

/// `--insecure-no-auth` only: accepts any certificate but still checks that the peer holds
/// the key it presents (the handshake signature), so the session is encrypted end to end.
/// Public for tests that play an outsider (e.g. a handshake flood).
#[derive(Debug)]
pub struct AcceptAnyCert(pub Arc<CryptoProvider>);

impl AcceptAnyCert {
    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used by mesh".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for AcceptAnyCert {
    fn root_hint_subjects(&self) -> &[TlsDn] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used by mesh".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Turns a QUIC connection error into the reason shown in `meshctl status connections`,
/// naming authentication failures as such.
pub fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    let alert = |code: u64| (0x100..0x200).contains(&code).then(|| (code - 0x100) as u8);
    match e {
        E::TransportError(t) if alert(u64::from(t.code)).is_some() => {
            format!(
                "authentication failed: {}{}",
                t.reason,
                hint(alert(u64::from(t.code)))
            )
        }
        E::ConnectionClosed(c) if alert(u64::from(c.error_code)).is_some() => {
            let code = alert(u64::from(c.error_code));
            format!(
                "authentication failed: peer rejected the TLS handshake ({}){}",
                alert_name(code),
                hint(code)
            )
        }
        E::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            format!("closed by peer: {reason}")
        }
        E::TimedOut => "timed out (no answer from peer)".to_string(),
        other => other.to_string(),
    }
}

/// TLS alert descriptions (RFC 8446 §6) for the alerts a failed mesh handshake produces.
fn alert_name(code: Option<u8>) -> String {
    match code {
        Some(40) => "handshake_failure".into(),
        Some(42) => "bad_certificate".into(),
        Some(48) => "unknown_ca".into(),
        Some(51) => "decrypt_error: certificate signature does not verify".into(),
        Some(116) => "certificate_required".into(),
        Some(120) => "no_application_protocol: peer does not speak mesh/1".into(),
        Some(c) => format!("TLS alert {c}"),
        None => "unknown".into(),
    }
}

/// What a person should check for the usual causes.
fn hint(code: Option<u8>) -> &'static str {
    match code {
        Some(42 | 48 | 51) => " (different cluster secret? both ends need the same --secret-file)",
        Some(116) => {
            " (peer runs with --insecure-no-auth while we require a cluster secret, or the reverse)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guessable_secrets_are_refused_and_random_ones_pass() {
        // zxcvbn's estimates (log10 guesses) here: 14.4, 2.6, 4.5, 4.4, 8.2, 12.6.
        for weak in [
            "correcthorsebatterystaple",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "0123456789abcdef0123456789abcdef",
            "password1234password1234",
            "Winter2026!Winter2026!",
            "ab12cd34ef56gh78",
        ] {
            assert!(strength(weak.as_bytes()).is_err(), "{weak} passed");
        }
        // `head -c 32 /dev/urandom | base64`
        assert!(strength(b"m3Q9zq0l4cS8Vt1p2YxW7eR5uJ6nH0aKbF3dG8sT+Lo=").is_ok());
        assert!(strength(&[
            0x9f, 0x03, 0xe1, 0x55, 0x7a, 0xc2, 0x18, 0xd0, 0x4b, 0xee, 0x61, 0x2c, 0x95, 0x0f,
            0xb7, 0x3a, 0x48, 0xd9, 0x11, 0x6e
        ])
        .is_ok());
    }

    #[test]
    fn the_ca_key_depends_on_the_secret_and_the_kdf_only() {
        let secret = b"m3Q9zq0l4cS8Vt1p2YxW7eR5uJ6nH0aK";
        for kdf in [SecretKdf::Hkdf, SecretKdf::Argon2id] {
            let a = ca_key_from_secret(secret, kdf).unwrap();
            let again = ca_key_from_secret(secret, kdf).unwrap();
            let other = ca_key_from_secret(b"m3Q9zq0l4cS8Vt1p2YxW7eR5uJ6nH0aL", kdf).unwrap();
            assert_eq!(a.public_key_raw(), again.public_key_raw());
            assert_ne!(a.public_key_raw(), other.public_key_raw());
        }
        let hkdf = ca_key_from_secret(secret, SecretKdf::Hkdf).unwrap();
        let argon = ca_key_from_secret(secret, SecretKdf::Argon2id).unwrap();
        assert_ne!(hkdf.public_key_raw(), argon.public_key_raw());
        assert!(matches!(
            ca_key_from_secret(b"short", SecretKdf::Hkdf),
            Err(TlsError::WeakSecret(5))
        ));
    }
}
