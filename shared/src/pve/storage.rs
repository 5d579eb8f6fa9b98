//! Storage content calls: list the volumes of a storage (`GET
//! /nodes/{node}/storage/{storage}/content`) and free one (`DELETE .../content/{volume}`,
//! an `imgdel` task), as pve-storage's `API2/Storage/Content.pm` serves them.

use reqwest::Method;
use serde::Deserialize;

use super::client::{Params, PveClient, seg};
use super::error::PveError;
use super::lenient;
use super::upid::Upid;

/// One volume of `GET /nodes/{node}/storage/{storage}/content`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ContentEntry {
    /// `<storage>:<volume name>`.
    pub volid: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub content: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub size: Option<u64>,
    /// The guest the volume's name says it belongs to (`vm-<vmid>-disk-N`).
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub vmid: Option<u64>,
}

impl PveClient {
    /// `GET /nodes/{node}/storage/{storage}/content[?content=..]`
    pub async fn storage_content(
        &self,
        node: &str,
        storage: &str,
        content: Option<&str>,
    ) -> Result<Vec<ContentEntry>, PveError> {
        self.get(
            &format!("/nodes/{}/storage/{}/content", seg(node), seg(storage)),
            Params::new().opt_str("content", content),
        )
        .await
    }

    /// `DELETE /nodes/{node}/storage/{storage}/content/{volume}` → task `imgdel`.
    pub async fn delete_volume(
        &self,
        node: &str,
        storage: &str,
        volid: &str,
    ) -> Result<Upid, PveError> {
        self.call(
            Method::DELETE,
            &format!(
                "/nodes/{}/storage/{}/content/{}",
                seg(node),
                seg(storage),
                seg(volid)
            ),
            Params::new(),
        )
        .await
    }
}
