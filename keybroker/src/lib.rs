//! nodecrypt key broker.
