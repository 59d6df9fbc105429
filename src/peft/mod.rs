//! Parameter-efficient fine-tuning: LoRA configuration, initialisation, Hugging Face PEFT's file
//! format (save/load), and merging an adapter into its base model.

pub mod adapter;
pub mod lora;
pub mod merge;
