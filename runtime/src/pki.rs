//! X.509 scheme and mutual-TLS configuration.
//!
//! Every certificate issued by a ConPaaS CA carries the holder's identity in one
//! subject-alternative-name URI: `urn:conpaas:<role>:u<user id>:a<application id>`
//! (for example `urn:conpaas:agent:u3:a7`), plus the DNS name [`SERVER_NAME`] that
//! clients use as TLS server name (no host name checks, as in the original, but the
//! role/user/application rules below are enforced on both sides).  Keys are ECDSA
//! P-256, signatures ECDSA-SHA256, serial numbers are 16 random bytes.
//!
//! Rules ([`PeerRule`]):
//! * a manager accepts `user` and `manager` certificates of its own user and
//!   application (a `user` certificate issued for application 0 is valid for all
//!   applications of that user);
//! * an agent accepts `manager` and `agent` certificates of the same user **and**
//!   application;
//! * there is no CN-based bypass: the CA certificate is only a trust anchor.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use time::{Duration, OffsetDateTime};

/// TLS server name used by every client; present as DNS SAN in every issued certificate.
pub const SERVER_NAME: &str = "conpaas";
const URN_PREFIX: &str = "urn:conpaas:";

/// Standard file names (as in the original `certs/` directories).
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const CA_CERT_FILE: &str = "ca_cert.pem";
pub const CA_KEY_FILE: &str = "ca_key.pem";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Agent,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Agent => "agent",
            Role::User => "user",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "manager" => Ok(Role::Manager),
            "agent" => Ok(Role::Agent),
            "user" => Ok(Role::User),
            other => bail!("unknown role '{other}' (expected manager, agent or user)"),
        }
    }
}

/// Who a certificate belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub uid: u64,
    pub app: u64,
}

impl Identity {
    pub fn urn(&self) -> String {
        format!("{URN_PREFIX}{}:u{}:a{}", self.role, self.uid, self.app)
    }

    pub fn parse_urn(s: &str) -> Option<Identity> {
        let rest = s.strip_prefix(URN_PREFIX)?;
        let mut parts = rest.split(':');
        let role = parts.next()?.parse().ok()?;
        let uid = parts.next()?.strip_prefix('u')?.parse().ok()?;
        let app = parts.next()?.strip_prefix('a')?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Identity { role, uid, app })
    }

    /// Extracts the identity from a DER certificate. Exactly one ConPaaS URN must be present.
    pub fn from_der(der: &[u8]) -> Result<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow!("bad certificate: {e}"))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| anyhow!("bad subjectAltName: {e}"))?
            .ok_or_else(|| anyhow!("certificate has no subjectAltName"))?;
        let mut found = None;
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if uri.starts_with(URN_PREFIX) {
                    if found.is_some() {
                        bail!("certificate carries more than one ConPaaS identity");
                    }
                    found = Some(
                        Identity::parse_urn(uri)
                            .ok_or_else(|| anyhow!("malformed ConPaaS identity '{uri}'"))?,
                    );
                }
            }
        }
        found.ok_or_else(|| anyhow!("certificate carries no ConPaaS identity"))
    }
}

/// Which peers a TLS endpoint accepts.
#[derive(Clone, Debug)]
pub struct PeerRule {
    pub roles: Vec<Role>,
    pub uid: u64,
    /// `None`: any application of the user.
    pub app: Option<u64>,
}

impl PeerRule {
    /// Server rule of a manager: `user`/`manager` of its own user and application.
    pub fn manager_server(uid: u64, app: u64) -> Self {
        PeerRule {
            roles: vec![Role::User, Role::Manager],
            uid,
            app: Some(app),
        }
    }
    /// Server rule of an agent: `manager`/`agent` of the same user and application.
    pub fn agent_server(uid: u64, app: u64) -> Self {
        PeerRule {
            roles: vec![Role::Manager, Role::Agent],
            uid,
            app: Some(app),
        }
    }

    pub fn check(&self, id: &Identity) -> Result<()> {
        if !self.roles.contains(&id.role) {
            bail!("role '{}' not accepted", id.role);
        }
        if id.uid != self.uid {
            bail!(
                "certificate of user {} not accepted (expected {})",
                id.uid,
                self.uid
            );
        }
        if let Some(app) = self.app {
            let wildcard = id.role == Role::User && id.app == 0;
            if id.app != app && !wildcard {
                bail!(
                    "certificate of application {} not accepted (expected {app})",
                    id.app
                );
            }
        }
        Ok(())
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system random generator failed");
    b
}

/// Random hex string of `n` bytes (tokens, node ids).
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system random generator failed");
    hex::encode(b)
}

fn serial() -> SerialNumber {
    let mut b: [u8; 16] = random_bytes();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // never a leading zero byte
    SerialNumber::from_slice(&b)
}

/// A certificate authority (cert + key in PEM).
pub struct Ca {
    pub cert_pem: String,
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn generate(common_name: &str, days: i64) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.distinguished_name
            .push(DnType::OrganizationName, "ConPaaS");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.serial_number = Some(serial());
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::minutes(5);
        p.not_after = now + Duration::days(days);
        let cert = p.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: cert,
            key,
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca> {
        let key = KeyPair::from_pem(key_pem).context("parsing CA key")?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem).context("parsing CA cert")?;
        let issuer = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            issuer,
            key,
        })
    }

    pub fn load(dir: &Path) -> Result<Ca> {
        let c = std::fs::read_to_string(dir.join(CA_CERT_FILE))
            .with_context(|| format!("reading {}", dir.join(CA_CERT_FILE).display()))?;
        let k = std::fs::read_to_string(dir.join(CA_KEY_FILE))
            .with_context(|| format!("reading {}", dir.join(CA_KEY_FILE).display()))?;
        Ca::from_pem(&c, &k)
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        write_file(&dir.join(CA_CERT_FILE), &self.cert_pem, 0o644)?;
        write_file(&dir.join(CA_KEY_FILE), &self.key.serialize_pem(), 0o600)?;
        Ok(())
    }

    fn params_for(&self, id: &Identity, cn: &str, validity: Validity) -> Result<CertificateParams> {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.distinguished_name
            .push(DnType::OrganizationName, "ConPaaS");
        p.distinguished_name.push(
            DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 1]),
            id.uid.to_string(),
        );
        p.subject_alt_names = vec![
            SanType::URI(id.urn().try_into()?),
            SanType::DnsName(SERVER_NAME.try_into()?),
        ];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(serial());
        p.not_before = validity.not_before;
        p.not_after = validity.not_after;
        Ok(p)
    }

    /// Issues a certificate and a fresh key: returns (cert PEM, key PEM).
    pub fn issue(&self, id: &Identity, cn: &str, validity: Validity) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let cert = self
            .params_for(id, cn, validity)?
            .signed_by(&key, &self.issuer, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a CSR. Only the CSR's public key is used (its signature is verified); subject and
    /// identity come from the caller (i.e. from the enrolment token), never from the CSR.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &Identity,
        cn: &str,
        validity: Validity,
    ) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).context("invalid CSR")?;
        let cert = self.params_for(id, cn, validity)?.signed_by(
            &csr.public_key,
            &self.issuer,
            &self.key,
        )?;
        Ok(cert.pem())
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(days),
        }
    }
}

/// Generates a key pair and a CSR (node side of the enrolment): returns (key PEM, CSR PEM).
pub fn generate_key_and_csr(cn: &str) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    let csr = p.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

pub fn write_file(path: &Path, content: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Paths of a certificate directory (`cert.pem`, `key.pem`, `ca_cert.pem`).
#[derive(Clone, Debug)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl CertPaths {
    pub fn in_dir(dir: &Path) -> Self {
        CertPaths {
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
            ca: dir.join(CA_CERT_FILE),
        }
    }

    pub fn exist(&self) -> bool {
        self.cert.exists() && self.key.exists() && self.ca.exists()
    }

    fn load(
        &self,
    ) -> Result<(
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        RootCertStore,
    )> {
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .with_context(|| format!("reading {}", self.cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", self.cert.display()))?;
        if certs.is_empty() {
            bail!("no certificate in {}", self.cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("reading key {}", self.key.display()))?;
        Ok((certs, key, roots_from_file(&self.ca)?))
    }

    /// Identity of our own certificate.
    pub fn identity(&self) -> Result<Identity> {
        let cert = CertificateDer::from_pem_file(&self.cert)
            .with_context(|| format!("reading {}", self.cert.display()))?;
        Identity::from_der(&cert)
    }
}

pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem) {
        roots.add(c.context("parsing CA certificate")?)?;
    }
    if roots.is_empty() {
        bail!("no CA certificate found");
    }
    Ok(roots)
}

pub fn roots_from_file(path: &Path) -> Result<RootCertStore> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    roots_from_pem(&pem).with_context(|| format!("in {}", path.display()))
}

#[derive(Debug)]
struct RoleClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    rule: PeerRule,
}

fn identity_error(e: anyhow::Error) -> rustls::Error {
    tracing::info!("peer certificate refused: {e:#}");
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

impl ClientCertVerifier for RoleClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = Identity::from_der(end_entity).map_err(identity_error)?;
        self.rule.check(&id).map_err(identity_error)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct RoleServerVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    rule: Option<PeerRule>,
}

impl ServerCertVerifier for RoleServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(SERVER_NAME).expect("valid server name");
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)?;
        let id = Identity::from_der(end_entity).map_err(identity_error)?;
        if let Some(rule) = &self.rule {
            rule.check(&id).map_err(identity_error)?;
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// mTLS server configuration: our cert, client certs required and checked against `rule`.
pub fn server_config(paths: &CertPaths, rule: PeerRule) -> Result<Arc<ServerConfig>> {
    let (certs, key, roots) = paths.load()?;
    let prov = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), prov.clone())
        .build()
        .map_err(|e| anyhow!("client verifier: {e}"))?;
    let verifier = Arc::new(RoleClientVerifier { inner, rule });
    let mut cfg = ServerConfig::builder_with_provider(prov)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Server-auth-only configuration (enrolment endpoint: the node has no certificate yet).
pub fn enrol_server_config(paths: &CertPaths) -> Result<Arc<ServerConfig>> {
    let (certs, key, _) = paths.load()?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

fn server_verifier(
    roots: RootCertStore,
    rule: Option<PeerRule>,
) -> Result<Arc<RoleServerVerifier>> {
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| anyhow!("server verifier: {e}"))?;
    Ok(Arc::new(RoleServerVerifier { inner, rule }))
}

/// mTLS client configuration: presents our cert, checks the server against `rule`.
pub fn client_config(paths: &CertPaths, rule: PeerRule) -> Result<Arc<ClientConfig>> {
    let (certs, key, roots) = paths.load()?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier(roots, Some(rule))?)
        .with_client_auth_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

/// Client without a certificate that trusts `ca_pem` and expects a server of role `manager`
/// (used for enrolment).
pub fn anonymous_client_config(ca_pem: &[u8], rule: Option<PeerRule>) -> Result<Arc<ClientConfig>> {
    let roots = roots_from_pem(ca_pem)?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier(roots, rule)?)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urn_roundtrip_and_rejects_garbage() {
        let id = Identity {
            role: Role::Agent,
            uid: 3,
            app: 7,
        };
        assert_eq!(id.urn(), "urn:conpaas:agent:u3:a7");
        assert_eq!(Identity::parse_urn(&id.urn()), Some(id));
        for bad in [
            "urn:conpaas:root:u1:a1",
            "urn:conpaas:agent:3:a7",
            "urn:conpaas:agent:u3:a7:x",
            "x",
        ] {
            assert_eq!(Identity::parse_urn(bad), None, "{bad}");
        }
    }

    #[test]
    fn issued_cert_carries_identity_and_unique_serial() {
        let ca = Ca::generate("test CA", 10).unwrap();
        let id = Identity {
            role: Role::Manager,
            uid: 5,
            app: 9,
        };
        let (c1, _) = ca.issue(&id, "m", Validity::days(1)).unwrap();
        let (c2, _) = ca.issue(&id, "m", Validity::days(1)).unwrap();
        let d1 = CertificateDer::from_pem_slice(c1.as_bytes()).unwrap();
        let d2 = CertificateDer::from_pem_slice(c2.as_bytes()).unwrap();
        assert_eq!(Identity::from_der(&d1).unwrap(), id);
        let s1 = x509_parser::parse_x509_certificate(&d1)
            .unwrap()
            .1
            .serial
            .clone();
        let s2 = x509_parser::parse_x509_certificate(&d2)
            .unwrap()
            .1
            .serial
            .clone();
        assert_ne!(s1, s2);
        let sig = x509_parser::parse_x509_certificate(&d1)
            .unwrap()
            .1
            .signature_algorithm
            .algorithm
            .to_id_string();
        assert_eq!(sig, "1.2.840.10045.4.3.2", "ecdsa-with-SHA256");
    }

    #[test]
    fn csr_signing_uses_token_identity_not_csr_subject() {
        let ca = Ca::generate("test CA", 10).unwrap();
        let (_key, csr) = generate_key_and_csr("urn:conpaas:manager:u1:a1").unwrap();
        let id = Identity {
            role: Role::Agent,
            uid: 1,
            app: 2,
        };
        let pem = ca.sign_csr(&csr, &id, "node", Validity::days(1)).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(Identity::from_der(&der).unwrap(), id);
        assert!(ca
            .sign_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                &id,
                "n",
                Validity::days(1)
            )
            .is_err());
    }

    #[test]
    fn peer_rules() {
        let m = PeerRule::manager_server(1, 2);
        assert!(m
            .check(&Identity {
                role: Role::User,
                uid: 1,
                app: 2
            })
            .is_ok());
        assert!(m
            .check(&Identity {
                role: Role::User,
                uid: 1,
                app: 0
            })
            .is_ok());
        assert!(m
            .check(&Identity {
                role: Role::Manager,
                uid: 1,
                app: 2
            })
            .is_ok());
        assert!(m
            .check(&Identity {
                role: Role::Manager,
                uid: 1,
                app: 0
            })
            .is_err());
        assert!(m
            .check(&Identity {
                role: Role::Agent,
                uid: 1,
                app: 2
            })
            .is_err());
        assert!(m
            .check(&Identity {
                role: Role::User,
                uid: 2,
                app: 2
            })
            .is_err());
        let a = PeerRule::agent_server(1, 2);
        assert!(a
            .check(&Identity {
                role: Role::Agent,
                uid: 1,
                app: 2
            })
            .is_ok());
        assert!(a
            .check(&Identity {
                role: Role::User,
                uid: 1,
                app: 2
            })
            .is_err());
        assert!(a
            .check(&Identity {
                role: Role::Manager,
                uid: 1,
                app: 3
            })
            .is_err());
    }
}
