//! Storage content: the volumes on one storage as a node sees it
//! (`GET /nodes/{node}/storage/{storage}/content`) and freeing one
//! (`DELETE .../content/{volume}`, an `imgdel` task), as pve-storage's
//! `API2/Storage/Content.pm` serves them. labfleet uses them to free the disks a destroy
//! left behind (`Could not remove disk ..., check manually`) and for `producer audit`.

use reqwest::Method;
use serde::Deserialize;

use super::client::{Params, PveClient, seg};
use super::error::PveError;
use super::lenient;
use super::upid::Upid;

/// One entry of `GET /nodes/{node}/storage/{storage}/content`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct StorageVolume {
    /// `<storage>:<volname>`.
    pub volid: String,
    /// The VMID the volume belongs to, by its name.
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub vmid: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub size: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub content: Option<String>,
}

fn content_path(node: &str, storage: &str) -> String {
    format!("/nodes/{}/storage/{}/content", seg(node), seg(storage))
}

impl PveClient {
    /// The VM images on `storage` as `node` sees it, only those of `vmid` when given.
    pub async fn storage_content(
        &self,
        node: &str,
        storage: &str,
        vmid: Option<u32>,
    ) -> Result<Vec<StorageVolume>, PveError> {
        let params = Params::new().str("content", "images").opt_num("vmid", vmid);
        self.get(&content_path(node, storage), params).await
    }

    /// `DELETE /nodes/{node}/storage/{storage}/content/{volume}`: frees the volume in an
    /// `imgdel` task (under the storage's lock) and returns its UPID.
    pub async fn delete_volume(
        &self,
        node: &str,
        storage: &str,
        volid: &str,
    ) -> Result<Upid, PveError> {
        let path = format!("{}/{}", content_path(node, storage), seg(volid));
        self.call(Method::DELETE, &path, Params::new()).await
    }
}
