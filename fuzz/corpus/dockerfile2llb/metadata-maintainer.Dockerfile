FROM busybox
MAINTAINER someone <s@example.com>
