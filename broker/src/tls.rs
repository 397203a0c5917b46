//! The QUIC listener's certificate: the one configured, or a self-signed one kept in the data
//! directory.
//!
//! ```text
//! listeners.tls_cert + tls_key set ──▶ load both (PEM) ──────────────────────────┐
//! neither set ──▶ <data_dir>/tls/cert.pem + key.pem ─┬─ present, matching, and    ├─▶ rustls::ServerConfig
//!                                                    │  covering every name ─────┤   (TLS 1.3, ring,
//!                                                    └─ else: a new CA + leaf ───┘    ALPN sluice/1)
//! ```
//!
//! The self-signed certificate is a chain of two: a leaf for the broker's names (`localhost`,
//! `127.0.0.1`, `::1` and every `listeners.tls_names` entry), then the CA that signed it.
//! `cert.pem` holds both, so a client given `--ca-file <data_dir>/tls/cert.pem` finds the CA in
//! it. Chains of one do not work: webpki refuses a CA certificate as the end entity and does
//! not take a leaf as its own anchor. The CA's private key is never written: it signs this one
//! leaf and is dropped, so whoever reads the data directory still cannot mint other
//! certificates that clients trusting the file would accept. `key.pem` is the leaf's key,
//! mode 0600.
//!
//! The files are reused on later starts, so clients keep trusting them. They are created anew
//! (with a warning, since clients must then trust the new file) when one is missing, when they
//! do not load or do not match, or when the leaf lacks a name `listeners.tls_names` now lists.
//!
//! Every crypto call names the ring provider explicitly instead of relying on a process-wide
//! default, which would panic were a second provider ever linked in (DEPENDENCIES.md, pitfall 1).

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::config::Listeners;
use crate::storage::RealFs;
use crate::storage::fs::{FileSystem, write_file_durably};

/// The ALPN protocol of Sluice over QUIC: a client must offer it, or the handshake fails.
pub const ALPN_PROTOCOL: &[u8] = b"sluice/1";

/// The directory of the self-signed certificate, inside the data directory.
const DIRECTORY: &str = "tls";
/// The self-signed chain (leaf, then CA), which clients take as their CA file.
const CERTIFICATE_FILE: &str = "cert.pem";
/// The leaf's private key.
const KEY_FILE: &str = "key.pem";
/// Names every self-signed certificate covers, so local clients work without configuration.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Why the QUIC listener has no certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A configured or self-signed certificate file could not be read, parsed or written.
    #[error("{what} {}: {message}", path.display())]
    File {
        /// Which file: `listeners.tls_cert`, `listeners.tls_key`, or the self-signed ones.
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    /// The self-signed certificate could not be made (a name in `listeners.tls_names` that
    /// no certificate can carry, say).
    #[error("cannot create the self-signed certificate: {0}")]
    Generate(String),
    /// rustls refused the certificate and key (a key that does not match the certificate).
    #[error("{0}")]
    Config(String),
}

/// The key QUIC stateless resets are derived from: 32 random bytes, kept across restarts.
const RESET_KEY_FILE: &str = "stateless-reset.key";
const RESET_KEY_BYTES: usize = 32;

/// What a QUIC endpoint must keep across restarts for its old connections' peers to be told
/// they are gone: the key stateless resets are signed with, and the key connection ids are
/// hashed with (a packet for a connection id the endpoint did not make is dropped unanswered).
pub struct QuicEndpointKeys {
    pub reset: ring::hmac::Key,
    pub connection_ids: u64,
}

/// The keys of this broker's QUIC endpoint, derived from `<data_dir>/tls/stateless-reset.key`,
/// created (durably, owner-only) on first start and the same ever after.
///
/// A client whose broker crashed and restarted sends on its old connection; the new process
/// answers with a stateless reset, which it sends only for a connection id it could have made
/// and the client honours only if its token comes from the key the old process used. Fresh
/// keys every start (quinn's default) leave such clients waiting out their idle timeout (30 s)
/// instead of reconnecting at once.
///
/// # Errors
/// [`TlsError::File`] when the key cannot be read or written.
pub fn quic_endpoint_keys(data_dir: &Path) -> Result<QuicEndpointKeys, TlsError> {
    let directory = data_dir.join(DIRECTORY);
    let path = directory.join(RESET_KEY_FILE);
    let file_error = |error: io::Error| TlsError::File {
        what: "stateless reset key",
        path: path.clone(),
        message: error.to_string(),
    };
    let create = || -> Result<Vec<u8>, TlsError> {
        let mut fresh = vec![0u8; RESET_KEY_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut fresh)
            .map_err(|_| file_error(io::Error::other("no random bytes to make it from")))?;
        create_private_directory(data_dir, &directory)?;
        prepare_private_file(&path).map_err(file_error)?;
        write_file_durably(&RealFs, &path, &fresh).map_err(file_error)?;
        Ok(fresh)
    };
    let bytes = match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == RESET_KEY_BYTES => bytes,
        // Written durably, so only a damaged file is another length: replaced.
        Ok(_) => create()?,
        Err(error) if error.kind() == io::ErrorKind::NotFound => create()?,
        Err(error) => return Err(file_error(error)),
    };
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes);
    let tag = ring::hmac::sign(&reset, b"sluice connection ids");
    let mut connection_ids = [0u8; 8];
    connection_ids.copy_from_slice(&tag.as_ref()[..8]);
    Ok(QuicEndpointKeys {
        reset,
        connection_ids: u64::from_be_bytes(connection_ids),
    })
}

/// Where the broker keeps its self-signed certificate: `<data_dir>/tls/cert.pem`. Clients
/// trust it with `--ca-file` pointing there.
pub fn self_signed_certificate_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DIRECTORY).join(CERTIFICATE_FILE)
}

/// The TLS side of the QUIC listener: TLS 1.3 only (QUIC requires it), no client
/// certificates, ALPN `sluice/1`, with the configured certificate or the self-signed one
/// (created on first use). Reads and writes files: call it off the async runtime.
///
/// # Errors
/// A configured file is missing or not PEM, the key does not match the certificate, or the
/// self-signed files cannot be written.
pub fn server_config(
    listeners: &Listeners,
    data_dir: &Path,
) -> Result<rustls::ServerConfig, TlsError> {
    match (&listeners.tls_cert, &listeners.tls_key) {
        (Some(certificate_path), Some(key_path)) => {
            let chain = read_certificates("listeners.tls_cert", certificate_path)?;
            let key = read_private_key("listeners.tls_key", key_path)?;
            let config = build_server_config(chain, key).map_err(|error| {
                TlsError::Config(format!(
                    "listeners.tls_cert {} with listeners.tls_key {}: {error}",
                    certificate_path.display(),
                    key_path.display()
                ))
            })?;
            tracing::info!(certificate = %certificate_path.display(), "QUIC uses the configured certificate");
            Ok(config)
        }
        (None, None) => self_signed_server_config(data_dir, &listeners.tls_names),
        // Config::validate refuses this; a caller that skipped it still gets a clear error.
        _ => Err(TlsError::Config(
            "listeners.tls_cert and listeners.tls_key must be set together".to_owned(),
        )),
    }
}

fn self_signed_server_config(
    data_dir: &Path,
    extra_names: &[String],
) -> Result<rustls::ServerConfig, TlsError> {
    let directory = data_dir.join(DIRECTORY);
    let certificate_path = directory.join(CERTIFICATE_FILE);
    let key_path = directory.join(KEY_FILE);
    let names = subject_names(extra_names);

    if certificate_path.exists() && key_path.exists() {
        match reuse(&certificate_path, &key_path, &names) {
            Ok(config) => {
                tracing::info!(
                    certificate = %certificate_path.display(),
                    "QUIC uses the self-signed certificate; clients trust it with --ca-file {}",
                    certificate_path.display()
                );
                return Ok(config);
            }
            Err(reason) => tracing::warn!(
                certificate = %certificate_path.display(),
                %reason,
                "creating a new self-signed certificate; clients must trust the new file"
            ),
        }
    }

    let generated = generate(&names)?;
    write_self_signed(
        data_dir,
        &directory,
        &key_path,
        &certificate_path,
        &generated,
    )?;
    let config = build_server_config(generated.chain, generated.key)
        .map_err(|error| TlsError::Generate(format!("rustls refused it: {error}")))?;
    tracing::info!(
        certificate = %certificate_path.display(),
        names = ?names,
        "created a self-signed certificate for QUIC; clients trust it with --ca-file {}",
        certificate_path.display()
    );
    Ok(config)
}

/// `localhost`, `127.0.0.1`, `::1`, then the configured names, without repeats.
fn subject_names(extra_names: &[String]) -> Vec<String> {
    let mut names: Vec<String> = LOCAL_NAMES.iter().map(|name| (*name).to_owned()).collect();
    for name in extra_names {
        let name = name.trim();
        if !names.iter().any(|known| known.eq_ignore_ascii_case(name)) {
            names.push(name.to_owned());
        }
    }
    names
}

/// Loads the existing self-signed pair, or says why it cannot serve.
fn reuse(
    certificate_path: &Path,
    key_path: &Path,
    names: &[String],
) -> Result<rustls::ServerConfig, String> {
    let chain = read_certificates("self-signed certificate", certificate_path)
        .map_err(|error| error.to_string())?;
    let key = read_private_key("self-signed key", key_path).map_err(|error| error.to_string())?;
    let leaf = chain
        .first()
        .ok_or_else(|| "the certificate file is empty".to_owned())?;
    let parsed = rustls::server::ParsedCertificate::try_from(leaf)
        .map_err(|error| format!("the certificate does not parse: {error}"))?;
    let missing: Vec<&str> = names
        .iter()
        .filter(|name| {
            // A name rustls cannot check (a wildcard, say) is left to the certificate as it is.
            ServerName::try_from(name.as_str()).is_ok_and(|server_name| {
                rustls::client::verify_server_name(&parsed, &server_name).is_err()
            })
        })
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "it does not cover {} (listeners.tls_names changed)",
            missing.join(", ")
        ));
    }
    build_server_config(chain, key).map_err(|error| error.to_string())
}

fn build_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        // Checks that the key matches the leaf.
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    Ok(config)
}

fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |message: String| TlsError::File {
        what,
        path: path.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|error| file_error(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(error.to_string()))?;
    if chain.is_empty() {
        return Err(file_error("no PEM CERTIFICATE in it".to_owned()));
    }
    Ok(chain)
}

fn read_private_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|error| TlsError::File {
        what,
        path: path.to_owned(),
        message: format!("no usable PEM private key: {error}"),
    })
}

/// A new chain and its leaf's key, in memory and as the PEM text of the two files.
struct Generated {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    certificate_pem: String,
    key_pem: String,
}

fn generate(names: &[String]) -> Result<Generated, TlsError> {
    let failed = |error: rcgen::Error| TlsError::Generate(error.to_string());

    let mut authority_params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
    authority_params.distinguished_name = common_name("Sluice broker self-signed CA");
    // Path length 0: it signs leaves only, never another CA.
    authority_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    authority_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let authority_key = KeyPair::generate().map_err(failed)?;
    let authority =
        CertifiedIssuer::self_signed(authority_params, authority_key).map_err(failed)?;

    let mut leaf_params = CertificateParams::new(names.to_vec()).map_err(|error| {
        TlsError::Generate(format!(
            "a name of {names:?} cannot be a subject alternative name (see listeners.tls_names): {error}"
        ))
    })?;
    leaf_params.distinguished_name = common_name("Sluice broker");
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf_params.use_authority_key_identifier_extension = true;
    let leaf_key = KeyPair::generate().map_err(failed)?;
    let leaf = leaf_params
        .signed_by(&leaf_key, &*authority)
        .map_err(failed)?;

    Ok(Generated {
        chain: vec![leaf.der().clone(), authority.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        certificate_pem: format!("{}{}", leaf.pem(), authority.pem()),
        key_pem: leaf_key.serialize_pem(),
    })
}

fn common_name(name: &str) -> DistinguishedName {
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, name);
    distinguished_name
}

/// Writes the key, then the certificate, each durably. A crash between the two leaves a key
/// that does not match the certificate, which the next start notices and replaces.
fn write_self_signed(
    data_dir: &Path,
    directory: &Path,
    key_path: &Path,
    certificate_path: &Path,
    generated: &Generated,
) -> Result<(), TlsError> {
    let file_error = |what: &'static str, path: &Path, error: io::Error| TlsError::File {
        what,
        path: path.to_owned(),
        message: error.to_string(),
    };
    let filesystem = RealFs;
    create_private_directory(data_dir, directory)?;
    prepare_private_file(key_path)
        .map_err(|error| file_error("self-signed key", key_path, error))?;
    write_file_durably(&filesystem, key_path, generated.key_pem.as_bytes())
        .map_err(|error| file_error("self-signed key", key_path, error))?;
    write_file_durably(
        &filesystem,
        certificate_path,
        generated.certificate_pem.as_bytes(),
    )
    .map_err(|error| file_error("self-signed certificate", certificate_path, error))?;
    Ok(())
}

/// Creates `directory` (the data directory's `tls/`) if it is missing, readable by the owner
/// only since it holds private keys, and durably: the data directory is fsynced after.
fn create_private_directory(data_dir: &Path, directory: &Path) -> Result<(), TlsError> {
    let file_error = |what: &'static str, path: &Path, error: io::Error| TlsError::File {
        what,
        path: path.to_owned(),
        message: error.to_string(),
    };
    let filesystem = RealFs;
    filesystem
        .create_dir_all(data_dir)
        .map_err(|error| file_error("data directory", data_dir, error))?;
    if !directory.exists() {
        DirBuilder::new()
            .mode(0o700)
            .create(directory)
            .map_err(|error| file_error("certificate directory", directory, error))?;
        filesystem
            .sync_dir(data_dir)
            .map_err(|error| file_error("data directory", data_dir, error))?;
    }
    Ok(())
}

/// Creates the temporary file `write_file_durably` writes the key to, readable by the owner
/// only, so the key is never readable by others, not even between write and rename (the rename
/// keeps the mode).
fn prepare_private_file(key_path: &Path) -> io::Result<()> {
    let mut temporary = key_path.as_os_str().to_owned();
    temporary.push(".tmp");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    // A temporary file left by a crash keeps the mode it had; make sure of it.
    file.set_permissions(Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listeners(names: &[&str]) -> Listeners {
        Listeners {
            tls_names: names.iter().map(|name| (*name).to_owned()).collect(),
            ..Listeners::default()
        }
    }

    #[test]
    fn quic_endpoint_keys_are_made_once_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = quic_endpoint_keys(dir.path()).unwrap();
        let second = quic_endpoint_keys(dir.path()).unwrap();
        let sign =
            |keys: &QuicEndpointKeys| ring::hmac::sign(&keys.reset, b"cid").as_ref().to_vec();
        assert_eq!(sign(&first), sign(&second));
        assert_eq!(first.connection_ids, second.connection_ids);
        let path = dir.path().join(DIRECTORY).join(RESET_KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner only");
        // Another data directory, other keys.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            sign(&quic_endpoint_keys(other.path()).unwrap()),
            sign(&first)
        );
        // A damaged (short) file is replaced, not used.
        std::fs::write(&path, b"short").unwrap();
        let replaced = quic_endpoint_keys(dir.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), RESET_KEY_BYTES);
        assert_ne!(sign(&replaced), sign(&first));
    }

    #[test]
    fn creates_once_then_reuses() {
        let directory = tempfile::tempdir().unwrap();
        let data_dir = directory.path().join("data");
        server_config(&listeners(&[]), &data_dir).expect("first start creates");
        let certificate_path = self_signed_certificate_path(&data_dir);
        let key_path = data_dir.join("tls/key.pem");
        let first = std::fs::read(&certificate_path).unwrap();
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key is readable by its owner only");
        assert!(!data_dir.join("tls/key.pem.tmp").exists());

        server_config(&listeners(&[]), &data_dir).expect("second start reuses");
        assert_eq!(std::fs::read(&certificate_path).unwrap(), first);

        // A name the certificate lacks makes a new one that has it.
        server_config(&listeners(&["broker.example"]), &data_dir).expect("new name");
        let second = std::fs::read(&certificate_path).unwrap();
        assert_ne!(second, first);
        let chain: Vec<_> = CertificateDer::pem_slice_iter(&second)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(chain.len(), 2, "leaf and CA");
        let leaf = rustls::server::ParsedCertificate::try_from(&chain[0]).unwrap();
        for name in ["localhost", "127.0.0.1", "::1", "broker.example"] {
            let server_name = ServerName::try_from(name).unwrap();
            rustls::client::verify_server_name(&leaf, &server_name)
                .unwrap_or_else(|error| panic!("{name}: {error}"));
        }
    }

    #[test]
    fn replaces_a_key_that_does_not_match() {
        let directory = tempfile::tempdir().unwrap();
        server_config(&listeners(&[]), directory.path()).unwrap();
        let key_path = directory.path().join("tls/key.pem");
        // As a crash between the two writes would leave it.
        let stranger = KeyPair::generate().unwrap().serialize_pem();
        std::fs::write(&key_path, stranger.as_bytes()).unwrap();
        server_config(&listeners(&[]), directory.path()).expect("replaced");
        assert_ne!(std::fs::read_to_string(&key_path).unwrap(), stranger);
    }

    #[test]
    fn configured_files_are_loaded_and_errors_name_them() {
        let directory = tempfile::tempdir().unwrap();
        let generated = generate(&subject_names(&[])).unwrap();
        let certificate_path = directory.path().join("chain.pem");
        let key_path = directory.path().join("private.pem");
        std::fs::write(&certificate_path, &generated.certificate_pem).unwrap();
        std::fs::write(&key_path, &generated.key_pem).unwrap();
        let mut configured = listeners(&[]);
        configured.tls_cert = Some(certificate_path.clone());
        configured.tls_key = Some(key_path.clone());
        server_config(&configured, directory.path()).expect("configured pair loads");
        assert!(
            !directory.path().join("tls").exists(),
            "nothing self-signed is made when a certificate is configured"
        );

        configured.tls_key = Some(directory.path().join("missing.pem"));
        let error = server_config(&configured, directory.path()).unwrap_err();
        assert!(
            error.to_string().starts_with("listeners.tls_key ")
                && error.to_string().contains("missing.pem"),
            "{error}"
        );

        std::fs::write(&key_path, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        configured.tls_key = Some(key_path);
        let error = server_config(&configured, directory.path()).unwrap_err();
        assert!(error.to_string().contains("listeners.tls_cert"), "{error}");
    }
}
