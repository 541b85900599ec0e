from qlora_ft.cli import main

main()
