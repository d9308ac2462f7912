FROM busybox AS first
RUN echo first > /which
FROM busybox AS second
RUN echo second > /which
