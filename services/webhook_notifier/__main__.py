from services.webhook_notifier.service import main

main()
