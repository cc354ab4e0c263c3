//! Listing the whole prefix: every key at one revision, a page at a time, so that no single
//! answer of a large registry approaches the client's message limit.

use etcd_client::GetOptions;

use super::Shared;
use super::connect::MAX_MESSAGE_BYTES;
use super::error::Deadline;
use crate::registry::RegistryError;
use crate::registry::layout::prefix_end;

/// Keys per page when listing the whole prefix.
const LIST_PAGE: i64 = 500;

/// The keys and values of a listing, and the revision it was read at.
pub(crate) type Listed = (Vec<(String, Vec<u8>)>, i64);

impl Shared {
    /// Reads every key under the prefix at one revision, every page and its retries within
    /// `deadline`.
    pub(crate) async fn list_prefix(
        &self,
        op: &'static str,
        deadline: Deadline,
    ) -> Result<Listed, RegistryError> {
        self.within(op, deadline, self.list_pages(op)).await
    }

    async fn list_pages(&self, op: &'static str) -> Result<Listed, RegistryError> {
        let prefix = self.config.key_prefix().to_string();
        let end = prefix_end(prefix.as_bytes());
        let mut out = Vec::new();
        let mut from = prefix.into_bytes();
        let mut revision = 0;
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            let options = if revision > 0 {
                options.with_revision(revision)
            } else {
                options
            };
            let key = from.clone();
            let resp = self
                .call(op, |c| {
                    let (key, options) = (key.clone(), options.clone());
                    async move {
                        c.kv_client()
                            .max_decoding_message_size(MAX_MESSAGE_BYTES)
                            .get(key, Some(options))
                            .await
                    }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                out.push((
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                ));
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }
}
