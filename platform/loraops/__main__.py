from loraops.cli import main

raise SystemExit(main())
