"""Generate text from a fine-tuned model: `python inference.py --help`."""

from qlora_ft.cli import inference_main

if __name__ == "__main__":
    inference_main()
