DROP TABLE alert_notifications;
DROP TABLE alerts;
