from endodistill.cli import main

main()
