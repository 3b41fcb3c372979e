from gelugemm_cli.entry import main

main()
