from agoranet.cli.main import main

main()
