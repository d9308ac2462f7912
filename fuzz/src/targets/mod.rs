//! The targets, one module each.

pub mod cache_config;
pub mod dockerfile2llb;
pub mod dockerignore;
pub mod filesync;
pub mod image;
pub mod layer;
pub mod llb;
pub mod reference;
pub mod tarutil;
pub mod untar;
