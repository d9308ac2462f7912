FROM busybox AS base
RUN echo x > /gone
FROM base
RUN rm /gone
