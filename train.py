"""Fine-tune a GPT-2-family model with QLoRA: `python train.py --help`."""

from qlora_ft.cli import train_main

if __name__ == "__main__":
    train_main()
