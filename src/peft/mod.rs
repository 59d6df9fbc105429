//! Parameter-efficient fine-tuning: LoRA configuration, initialisation and Hugging Face PEFT's file
//! format (save/load). Independent of the models (merging lives with each architecture).

pub mod adapter;
pub mod lora;
