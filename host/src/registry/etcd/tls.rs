//! The TLS files of the connection to etcd, read and checked in one place.
//!
//! etcd's client skips whatever it cannot parse in a PEM file: a CA file that is not PEM
//! leaves it trusting nothing, and every handshake then fails with "UnknownIssuer", retried
//! forever. So the files are parsed here, the CA's certificates and the client certificate
//! as X.509, and the client key checked against its certificate (by comparing public keys,
//! with the same crypto provider the client uses): a bad file is a [`TlsFileError`] naming
//! the file and what is wrong with it, before anything dials. Files are read as every file the
//! host is pointed at is ([`read_regular`]): regular files only, of a bounded size.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsPaths;
use crate::fsutil::{FileError, read_regular};

/// Largest TLS file read. A CA bundle as large as a distribution's whole trust store is about
/// 200 KiB; a certificate or a key, a few KiB.
const MAX_TLS_FILE: u64 = 1024 * 1024;

/// One of the TLS files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// The CA of etcd's server certificate.
    Ca,
    /// The client certificate.
    Cert,
    /// The client certificate's key.
    Key,
}

/// A TLS file that cannot be used: which one, where, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct TlsFileError {
    /// Which file.
    pub file: TlsFile,
    /// Its path.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: TlsProblem,
}

/// What is wrong with a TLS file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsProblem {
    /// It cannot be read (missing, not a regular file, too large).
    #[error("cannot read it: {0}")]
    Read(Arc<FileError>),
    /// A PEM section is malformed.
    #[error("not valid PEM: {0}")]
    BadPem(String),
    /// No `CERTIFICATE` section at all (say, a DER file, or a key given as the certificate).
    #[error("no PEM certificate in it (a `-----BEGIN CERTIFICATE-----` section)")]
    NoCertificate,
    /// A certificate section that is not a certificate.
    #[error("a certificate in it cannot be parsed: {0}")]
    BadCertificate(rustls::Error),
    /// No private key section.
    #[error("no PEM private key in it (PKCS#1, PKCS#8 or SEC1)")]
    NoKey,
    /// A key of an unsupported type or that cannot be parsed.
    #[error("the private key cannot be used: {0}")]
    BadKey(rustls::Error),
    /// The key is not the one of the client certificate.
    #[error("the private key does not match the client certificate {}", .0.display())]
    KeyMismatch(PathBuf),
}

/// The files' contents, checked.
pub(super) struct TlsContents {
    pub(super) ca: Vec<u8>,
    pub(super) client: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsPaths {
    /// Reads and checks the files (I/O: a build step, not validation). The registry does it
    /// again at each connect; calling it at start makes a bad file a start-up error.
    pub fn check(&self) -> Result<(), TlsFileError> {
        self.load().map(drop)
    }

    pub(super) fn load(&self) -> Result<TlsContents, TlsFileError> {
        let ca = read(TlsFile::Ca, &self.ca)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(TlsFile::Ca, &self.ca, &ca)? {
            roots.add(cert).map_err(|e| TlsFileError {
                file: TlsFile::Ca,
                path: self.ca.clone(),
                problem: TlsProblem::BadCertificate(e),
            })?;
        }
        let client = match &self.client {
            Some((cert_path, key_path)) => {
                let cert = read(TlsFile::Cert, cert_path)?;
                let key = read(TlsFile::Key, key_path)?;
                check_identity(cert_path, &cert, key_path, &key)?;
                Some((cert, key))
            }
            None => None,
        };
        Ok(TlsContents { ca, client })
    }
}

fn read(file: TlsFile, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    read_regular(path, MAX_TLS_FILE).map_err(|e| TlsFileError {
        file,
        path: path.to_path_buf(),
        problem: TlsProblem::Read(Arc::new(e)),
    })
}

/// Every certificate of a PEM file, at least one.
fn certificates(
    file: TlsFile,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let fail = |problem| TlsFileError {
        file,
        path: path.to_path_buf(),
        problem,
    };
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(pem_problem(e, TlsProblem::NoCertificate)))?;
    if certs.is_empty() {
        return Err(fail(TlsProblem::NoCertificate));
    }
    Ok(certs)
}

/// The client certificate and its key: both parse, and the key is the certificate's.
fn check_identity(
    cert_path: &Path,
    cert: &[u8],
    key_path: &Path,
    key: &[u8],
) -> Result<(), TlsFileError> {
    let chain = certificates(TlsFile::Cert, cert_path, cert)?;
    let key_error = |problem| TlsFileError {
        file: TlsFile::Key,
        path: key_path.to_path_buf(),
        problem,
    };
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| key_error(pem_problem(e, TlsProblem::NoKey)))?;
    let provider = rustls::crypto::ring::default_provider();
    match rustls::sign::CertifiedKey::from_der(chain, key, &provider) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => {
            Err(key_error(TlsProblem::KeyMismatch(cert_path.to_path_buf())))
        }
        Err(e @ rustls::Error::InvalidCertificate(_)) => Err(TlsFileError {
            file: TlsFile::Cert,
            path: cert_path.to_path_buf(),
            problem: TlsProblem::BadCertificate(e),
        }),
        Err(e) => Err(key_error(TlsProblem::BadKey(e))),
    }
}

fn pem_problem(e: pem::Error, none_found: TlsProblem) -> TlsProblem {
    match e {
        pem::Error::NoItemsFound => none_found,
        other => TlsProblem::BadPem(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs openssl in `dir` (the end-to-end tests' TLS fixtures are made with it too).
    fn openssl(dir: &Path, args: &[&str]) -> bool {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `<name>.pem`, a self-signed certificate (a CA, or a client identity), and its key
    /// `<name>.key`.
    fn self_signed(dir: &Path, name: &str) {
        let (key, cert) = (format!("{name}.key"), format!("{name}.pem"));
        assert!(
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &key,
                    "-out",
                    &cert,
                    "-days",
                    "1",
                    "-subj",
                    &format!("/CN={name}"),
                ],
            ),
            "openssl is needed for this test"
        );
    }

    fn paths(dir: &Path, ca: &str, client: Option<(&str, &str)>) -> TlsPaths {
        TlsPaths {
            ca: dir.join(ca),
            client: client.map(|(c, k)| (dir.join(c), dir.join(k))),
        }
    }

    #[test]
    fn good_files_pass() {
        let dir = tempfile::tempdir().unwrap();
        self_signed(dir.path(), "ca");
        self_signed(dir.path(), "client");
        paths(dir.path(), "ca.pem", None).check().unwrap();
        paths(dir.path(), "ca.pem", Some(("client.pem", "client.key")))
            .check()
            .unwrap();
    }

    #[test]
    fn special_files_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        self_signed(dir.path(), "ca");
        self_signed(dir.path(), "client");
        let special = dir.path().join("special");
        for (ca, cert, key) in [
            ("special", "client.pem", "client.key"),
            ("ca.pem", "special", "client.key"),
            ("ca.pem", "client.pem", "special"),
        ] {
            let paths = paths(dir.path(), ca, Some((cert, key)));
            crate::fsutil::testing::assert_refuses_special_files(&special, move || {
                paths.check().map_err(|e| e.to_string())
            });
        }
        std::fs::write(&special, vec![b'x'; MAX_TLS_FILE as usize + 1]).unwrap();
        let err = paths(dir.path(), "special", None).check().unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }

    #[test]
    fn bad_files_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        self_signed(dir.path(), "ca");
        self_signed(dir.path(), "other");
        std::fs::write(dir.path().join("text"), "not a certificate\n").unwrap();
        std::fs::write(
            dir.path().join("torn.pem"),
            "-----BEGIN CERTIFICATE-----\nMIIB\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("garbage.pem"),
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let cases = [
            (
                paths(dir.path(), "missing", None),
                TlsFile::Ca,
                "cannot read",
            ),
            (
                paths(dir.path(), "text", None),
                TlsFile::Ca,
                "no PEM certificate",
            ),
            (
                paths(dir.path(), "ca.key", None),
                TlsFile::Ca,
                "no PEM certificate",
            ),
            (
                paths(dir.path(), "torn.pem", None),
                TlsFile::Ca,
                "not valid PEM",
            ),
            (
                paths(dir.path(), "garbage.pem", None),
                TlsFile::Ca,
                "cannot be parsed",
            ),
            (
                paths(dir.path(), "ca.pem", Some(("text", "ca.key"))),
                TlsFile::Cert,
                "no PEM certificate",
            ),
            (
                paths(dir.path(), "ca.pem", Some(("ca.pem", "ca.pem"))),
                TlsFile::Key,
                "no PEM private key",
            ),
            (
                paths(dir.path(), "ca.pem", Some(("ca.pem", "other.key"))),
                TlsFile::Key,
                "does not match",
            ),
        ];
        for (paths, file, want) in cases {
            let err = paths.check().unwrap_err();
            assert_eq!(err.file, file, "{paths:?}: {err}");
            let line = err.to_string();
            assert!(line.contains(want), "{paths:?}: {line}");
            assert!(line.contains(&err.path.display().to_string()), "{line}");
        }
    }
}
