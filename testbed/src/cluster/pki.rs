//! The cluster's credentials, made fresh for every cluster: one CA (kubeadm's `ca.crt`), the
//! apiserver's serving certificate (with every name pods and nodes dial it by), its client
//! certificate towards kubelets, the service-account signing key, and a client certificate
//! per component identity, as kubeadm makes them.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};

/// Who a component is to the apiserver: a client certificate's CN (user) and O (group), as
/// kubeadm issues them; RBAC's default bindings give each its rights.
pub struct Identity {
    /// File stem of its certificate and key (`<file>.crt`, `<file>.key`).
    pub file: String,
    pub user: String,
    pub group: Option<String>,
}

impl Identity {
    pub fn new(file: &str, user: &str, group: Option<&str>) -> Identity {
        Identity {
            file: file.into(),
            user: user.into(),
            group: group.map(str::to_string),
        }
    }
}

pub struct Pki {
    pub ca_pem: String,
    ca: Issuer<'static, KeyPair>,
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(())
}

impl Pki {
    pub fn new() -> Result<Pki> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.distinguished_name = dn("mesh-testbed kubernetes CA", None);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key)?;
        Ok(Pki {
            ca_pem: cert.pem(),
            ca: Issuer::new(p, key),
        })
    }

    /// A leaf certificate + key signed by the CA, written as `dir/name.crt` / `.key`.
    fn leaf(
        &self,
        dir: &Path,
        name: &str,
        subject: DistinguishedName,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<()> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.distinguished_name = subject;
        p.subject_alt_names = sans;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![usage];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.ca)?;
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem())?;
        write_private(&dir.join(format!("{name}.key")), &key.serialize_pem())
    }

    /// Everything the control plane reads from `/etc/kubernetes/pki`.
    pub fn write_control_plane(
        &self,
        dir: &Path,
        node_name: &str,
        address: Ipv4Addr,
        service_ip: Ipv4Addr,
    ) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.crt"), &self.ca_pem)?;
        let mut sans = vec![
            SanType::IpAddress(address.into()),
            SanType::IpAddress(service_ip.into()),
            SanType::IpAddress(Ipv4Addr::LOCALHOST.into()),
        ];
        for n in [
            node_name,
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ] {
            sans.push(SanType::DnsName(n.try_into()?));
        }
        self.leaf(
            dir,
            "apiserver",
            dn("kube-apiserver", None),
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        // How the apiserver authenticates to kubelets (exec, logs, port-forward).
        self.leaf(
            dir,
            "apiserver-kubelet-client",
            dn("kube-apiserver-kubelet-client", Some("system:masters")),
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let sa = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        write_private(&dir.join("sa.key"), &sa.serialize_pem())?;
        std::fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
        Ok(())
    }

    /// The CA and `who`'s client certificate in `dir` (a node's `/etc/kubernetes/pki`).
    pub fn write_client(&self, dir: &Path, who: &Identity) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.crt"), &self.ca_pem)?;
        self.leaf(
            dir,
            &who.file,
            dn(&who.user, who.group.as_deref()),
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// A kubeconfig for `who`, with paths to the CA and its certificate in `pki` (as the
    /// reading process sees them).
    pub fn kubeconfig(server: &str, pki: &str, who: &Identity) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mesh-testbed\n  cluster:\n    server: {server}\n    certificate-authority: {pki}/ca.crt\nusers:\n- name: {user}\n  user:\n    client-certificate: {pki}/{file}.crt\n    client-key: {pki}/{file}.key\ncontexts:\n- name: {user}@mesh-testbed\n  context: {{cluster: mesh-testbed, user: {user}, namespace: default}}\ncurrent-context: {user}@mesh-testbed\n",
            user = who.user,
            file = who.file,
        )
    }
}
