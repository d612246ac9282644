//! The file system on top of the coherence protocol: block layout and patches
//! ([`layout`]), the client API ([`client`]), the name-space check and repair ([`fsck`]),
//! and the whole-cluster simulations ([`sim`], [`clean_sim`]).

#[cfg(feature = "sim")]
pub mod clean_sim;
pub mod client;
pub mod fsck;
pub mod layout;
#[cfg(feature = "sim")]
pub mod sim;
